//! What the dataplane reads from the kernel: interface indexes, MACs and
//! queue counts (sysfs), addresses and the neighbour table (rtnetlink
//! dumps). Control-thread code; never called per packet.

use crate::wire::MacAddr;
use ipnet::IpNet;
use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage, AddressScope},
    link::{LinkAttribute, LinkFlags, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use std::ffi::CString;
use std::io;
use std::net::IpAddr;

/// An interface as the kernel describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub ifindex: u32,
    pub mac: MacAddr,
    pub mtu: u32,
    /// Number of RX queues (sysfs `queues/rx-*`).
    pub rx_queues: u32,
    /// ARPHRD type (1: Ethernet).
    pub kind: u32,
}

/// Looks an interface up by name. `None` when it does not exist.
pub fn link_by_name(name: &str) -> io::Result<Option<Link>> {
    let c =
        CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name has a NUL byte"))?;
    // SAFETY: c is a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if ifindex == 0 {
        return Ok(None);
    }
    let base = format!("/sys/class/net/{name}");
    let kind = std::fs::read_to_string(format!("{base}/type"))?
        .trim()
        .parse()
        .unwrap_or(0);
    let mac_text = std::fs::read_to_string(format!("{base}/address"))?;
    let mac = mac_text.trim().parse::<MacAddr>().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{name} has no Ethernet address ({:?})", mac_text.trim()),
        )
    })?;
    let mtu = std::fs::read_to_string(format!("{base}/mtu"))?
        .trim()
        .parse()
        .unwrap_or(1500);
    let rx_queues = std::fs::read_dir(format!("{base}/queues"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                .count() as u32
        })
        .unwrap_or(1)
        .max(1);
    Ok(Some(Link {
        name: name.to_string(),
        ifindex,
        mac,
        mtu,
        rx_queues,
        kind,
    }))
}

/// The answer to a route lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteInfo {
    pub oif: u32,
    pub gateway: Option<IpAddr>,
    pub src: Option<IpAddr>,
}

/// An interface's state as the kernel reports it (`ip link show`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkState {
    pub name: String,
    /// Administratively up (IFF_UP: `ip link set IF up`).
    pub up: bool,
    /// The lower layer is up (IFF_LOWER_UP: carrier, or a veth's far end up).
    pub carrier: bool,
}

/// A route of the kernel's main table through routers: its prefix and its
/// next hops (interface, router address); several for a multipath route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayRoute {
    pub prefix: IpNet,
    pub hops: Vec<(u32, IpAddr)>,
}

/// A kernel neighbour entry with a usable link-layer address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    pub ip: IpAddr,
    pub mac: MacAddr,
}

/// A rtnetlink socket for dumps.
pub struct Netlink {
    sock: Socket,
    buf: Vec<u8>,
    seq: u32,
}

/// A socket subscribed to the kernel's address changes (IPv4 and IPv6):
/// readable when an address was added or removed anywhere.
pub struct AddressEvents {
    sock: Socket,
    buf: Vec<u8>,
}

/// A non-blocking rtnetlink socket subscribed to multicast `groups`.
fn subscribe(groups: u32) -> io::Result<Socket> {
    let mut sock = Socket::new(NETLINK_ROUTE)?;
    sock.bind(&SocketAddr::new(0, groups))?;
    sock.set_non_blocking(true)?;
    Ok(sock)
}

impl AddressEvents {
    pub fn open() -> io::Result<Self> {
        const RTMGRP_IPV4_IFADDR: u32 = 0x10;
        const RTMGRP_IPV6_IFADDR: u32 = 0x100;
        Ok(AddressEvents {
            sock: subscribe(RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR)?,
            buf: vec![0; 16 * 1024],
        })
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.sock)
    }

    /// Drains what arrived; true if anything did (the caller re-reads the
    /// addresses it cares about: simpler and as cheap as parsing events).
    pub fn drain(&mut self) -> bool {
        let mut any = false;
        while let Ok(n) = self.sock.recv(&mut &mut self.buf[..], 0) {
            if n == 0 {
                break;
            }
            any = true;
        }
        any
    }
}

/// What a neighbour message says about an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NeighbourChange {
    /// Resolved: the fast path may send to it.
    Usable(Neighbour),
    /// Gone, failed or not resolved (yet): the fast path must not.
    Unusable { ifindex: u32, ip: IpAddr },
    /// Not an IP neighbour with an Ethernet address (bridge FDB, ...).
    Other,
}

impl NeighbourChange {
    /// The one reading of a neighbour message, for dumps and events.
    /// `new` is false for RTM_DELNEIGH.
    fn of(n: &NeighbourMessage, new: bool) -> NeighbourChange {
        let mut ip = None;
        let mut mac = None;
        for a in &n.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => ip = Some(IpAddr::V4(*v4)),
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => ip = Some(IpAddr::V6(*v6)),
                NeighbourAttribute::LinkLocalAddress(l) if l.len() == 6 => {
                    let mut m = [0u8; 6];
                    m.copy_from_slice(l);
                    mac = Some(MacAddr(m));
                }
                _ => {}
            }
        }
        let ifindex = n.header.ifindex;
        let usable = new
            && !matches!(
                n.header.state,
                NeighbourState::Incomplete | NeighbourState::Failed | NeighbourState::None
            );
        match (ip, mac) {
            (Some(ip), Some(mac)) if usable => NeighbourChange::Usable(Neighbour { ifindex, ip, mac }),
            (Some(ip), _) => NeighbourChange::Unusable { ifindex, ip },
            _ => NeighbourChange::Other,
        }
    }
}

/// A socket subscribed to the kernel's neighbour changes (ARP and NDP)
/// and route changes: the control thread follows them instead of dumping
/// the neighbour table and asking for routes every round.
pub struct RoutingEvents {
    sock: Socket,
    buf: Vec<u8>,
    /// Routes through this interface are ours (the slow-path TUN's, one
    /// per tunnelled prefix): their events are not news.
    own_oif: u32,
    /// The LANs' interfaces and the default VNET's LAN subnets: the
    /// FIB is built from the LANs' addresses and from the main table's
    /// routes inside those subnets.
    lan_oifs: Vec<u32>,
    lan_subnets: Vec<IpNet>,
    /// What [`Self::absorb`] read while subway installed routes of its own,
    /// for the next [`Self::drain`]: neighbour changes, the other routes
    /// that changed, whether events were lost all the same.
    held: Vec<NeighbourChange>,
    held_routes: RouteNews,
    held_lost: bool,
}

/// What the route events read since the last drain say: whether the FIB
/// must follow, and which destinations' routes changed (a route to a peer's
/// endpoint is looked up again only if it lies inside one of them). A
/// route event on a busy box (DHCP, router advertisements, a routing
/// daemon) thus costs what it touches, not a rebuild of 100,000 routes
/// and a lookup per peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteNews {
    /// A route the FIB is built from changed: a LAN address (its local
    /// route), a main-table route inside a default-VNET LAN subnet
    /// (through a router on the LAN, or replaced by one elsewhere: a
    /// replace says only where the route goes now), or one whose next
    /// hops are kernel nexthop objects (which do not say where they lead).
    pub fib: bool,
    /// The destinations whose routes changed, up to [`RouteNews::MAX`].
    pub prefixes: Vec<IpNet>,
    /// More than that changed: any route may have.
    pub all: bool,
}

impl RouteNews {
    /// Prefixes kept one by one; past this many, [`RouteNews::all`].
    pub const MAX: usize = 64;

    /// Whether anything changed.
    pub fn any(&self) -> bool {
        self.fib || self.all || !self.prefixes.is_empty()
    }

    /// Whether the route to `ip` may have changed.
    pub fn touches(&self, ip: IpAddr) -> bool {
        self.all || self.prefixes.iter().any(|p| p.contains(&ip))
    }

    fn changed(&mut self, prefix: IpNet) {
        if self.all || self.prefixes.contains(&prefix) {
            return;
        }
        if self.prefixes.len() == Self::MAX {
            self.all = true;
            self.prefixes = Vec::new();
        } else {
            self.prefixes.push(prefix);
        }
    }

    fn merge(&mut self, other: RouteNews) {
        self.fib |= other.fib;
        self.all |= other.all;
        for p in other.prefixes {
            self.changed(p);
        }
    }

    /// Reads one route message (a route through `own_oif` is no news).
    fn note(&mut self, r: &RouteMessage, own_oif: u32, lan_oifs: &[u32], lan_subnets: &[IpNet]) {
        /// RTA_NH_ID: the route's next hops are a nexthop object.
        const RTA_NH_ID: u16 = 30;
        let mut oifs = Vec::new();
        let mut nh_object = false;
        for a in &r.attributes {
            match a {
                RouteAttribute::Oif(i) => oifs.push(*i),
                RouteAttribute::MultiPath(nhs) => oifs.extend(nhs.iter().map(|nh| nh.interface_index)),
                RouteAttribute::Other(nla) if netlink_packet_utils::nla::Nla::kind(nla) == RTA_NH_ID => {
                    nh_object = true
                }
                _ => {}
            }
        }
        if own_oif != 0 && oifs.contains(&own_oif) {
            return;
        }
        let Some(prefix) = route_prefix(r).map(|p| p.trunc()) else {
            self.all = true;
            self.fib = true;
            return;
        };
        let address = r.header.kind == RouteType::Local && oifs.iter().any(|o| lan_oifs.contains(o));
        let inside = route_table(r) == 254 && lan_subnets.iter().any(|s| s.contains(&prefix));
        self.fib |= nh_object || address || inside;
        self.changed(prefix);
    }
}

/// A route message's address as an IP address.
fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
        RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        _ => None,
    }
}

/// The table a route message is in (the attribute holds tables past 255).
fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(r.header.table as u32)
}

/// The destination prefix of a route message (no destination: the
/// family's default route); None if the message does not make one.
fn route_prefix(r: &RouteMessage) -> Option<IpNet> {
    let dst = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Destination(d) => route_ip(d),
            _ => None,
        })
        .unwrap_or(if r.header.address_family == AddressFamily::Inet6 {
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
        });
    IpNet::new(dst, r.header.destination_prefix_length).ok()
}

impl RoutingEvents {
    pub fn open() -> io::Result<Self> {
        const RTMGRP_NEIGH: u32 = 0x4;
        const RTMGRP_IPV4_ROUTE: u32 = 0x40;
        const RTMGRP_IPV6_ROUTE: u32 = 0x400;
        let sock = subscribe(RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE)?;
        // Room for one send of our own routes' events (512, about 1 KB of
        // socket memory each) between two absorbs: root may go past
        // rmem_max (SO_RCVBUFFORCE); if not, the default and re-reading
        // when they overflow.
        let want: libc::c_int = 4 << 20;
        // SAFETY: a valid socket and an int option of the right size.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&want as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        Ok(RoutingEvents {
            sock,
            buf: vec![0; 64 * 1024],
            own_oif: 0,
            lan_oifs: Vec::new(),
            lan_subnets: Vec::new(),
            held: Vec::new(),
            held_routes: RouteNews::default(),
            held_lost: false,
        })
    }

    /// Ignores changes of routes through `ifindex` (subway's own TUN: at
    /// start and on reload it installs one route per tunnelled prefix,
    /// 100,000 events that would each say "re-read the routes").
    pub fn ignore_routes_via(&mut self, ifindex: u32) {
        self.own_oif = ifindex;
    }

    /// What the FIB follows ([`RouteNews::fib`]): the addresses of the
    /// LANs on `ifindexes`, and the main table's routes inside `subnets`
    /// (the default VNET's LAN subnets, where routes through LAN routers
    /// are taken from).
    pub fn follow_lans(&mut self, ifindexes: &[u32], subnets: Vec<IpNet>) {
        self.lan_oifs = ifindexes.to_vec();
        self.lan_subnets = subnets;
    }

    /// The default VNET's LAN subnets changed (a FIB built anew).
    pub fn set_lan_subnets(&mut self, subnets: Vec<IpNet>) {
        self.lan_subnets = subnets;
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.sock)
    }

    /// Reads every neighbour change that arrived into `out`; returns what
    /// the route changes say. An error (ENOBUFS: the kernel dropped events
    /// because we were slow) means the caller must re-read everything.
    pub fn drain(&mut self, out: &mut Vec<NeighbourChange>) -> io::Result<RouteNews> {
        out.append(&mut self.held);
        let mut news = std::mem::take(&mut self.held_routes);
        if std::mem::take(&mut self.held_lost) {
            return Err(io::Error::from_raw_os_error(libc::ENOBUFS));
        }
        news.merge(self.read(out)?);
        Ok(news)
    }

    /// Reads what arrived now and keeps it for the next [`Self::drain`]:
    /// called between the sends of a bulk change of our own routes, whose
    /// events (ignored, one per route) would otherwise overflow the socket
    /// and cost a re-read of every route and neighbour.
    pub fn absorb(&mut self) {
        let mut held = std::mem::take(&mut self.held);
        match self.read(&mut held) {
            Ok(routes) => self.held_routes.merge(routes),
            Err(_) => self.held_lost = true,
        }
        self.held = held;
    }

    /// Whether [`Self::absorb`] kept anything for the next drain (the
    /// socket is then not readable, but there is news).
    pub fn holds(&self) -> bool {
        !self.held.is_empty() || self.held_routes.any() || self.held_lost
    }

    fn read(&mut self, out: &mut Vec<NeighbourChange>) -> io::Result<RouteNews> {
        let mut routes = RouteNews::default();
        loop {
            let n = match self.sock.recv(&mut &mut self.buf[..], 0) {
                Ok(0) => return Ok(routes),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(routes),
                Err(e) => return Err(e),
            };
            let mut off = 0;
            while off < n {
                let Ok(m) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[off..n]) else {
                    break;
                };
                let len = m.header.length as usize;
                match m.payload {
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)) => {
                        out.push(NeighbourChange::of(&n, true))
                    }
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(n)) => {
                        out.push(NeighbourChange::of(&n, false))
                    }
                    NetlinkPayload::InnerMessage(
                        RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r),
                    ) => {
                        routes.note(&r, self.own_oif, &self.lan_oifs, &self.lan_subnets);
                    }
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                off += len;
            }
        }
    }
}

impl Netlink {
    pub fn open() -> io::Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Netlink {
            sock,
            buf: vec![0; 64 * 1024],
            seq: 0,
        })
    }

    fn dump(&mut self, req: RouteNetlinkMessage, mut each: impl FnMut(RouteNetlinkMessage)) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let mut hdr = NetlinkHeader::default();
        hdr.flags = NLM_F_DUMP | NLM_F_REQUEST;
        hdr.sequence_number = self.seq;
        let mut msg = NetlinkMessage::new(hdr, NetlinkPayload::from(req));
        msg.finalize();
        let mut out = vec![0u8; msg.header.length as usize];
        msg.serialize(&mut out);
        self.sock.send(&out, 0)?;
        self.read_until(|m| match m.payload {
            NetlinkPayload::Done(_) => Ok(true),
            NetlinkPayload::Error(e) => Err(e.to_io()),
            NetlinkPayload::InnerMessage(inner) => {
                each(inner);
                Ok(false)
            }
            _ => Ok(false),
        })
    }

    /// Reads the socket's messages one by one into `each` until it says
    /// it has seen the last (true) or fails.
    fn read_until(
        &mut self,
        mut each: impl FnMut(NetlinkMessage<RouteNetlinkMessage>) -> io::Result<bool>,
    ) -> io::Result<()> {
        loop {
            let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
            let mut off = 0;
            while off < n {
                let m: NetlinkMessage<RouteNetlinkMessage> = NetlinkMessage::deserialize(&self.buf[off..n])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("netlink: {e}")))?;
                let len = m.header.length as usize;
                if each(m)? {
                    return Ok(());
                }
                if len == 0 {
                    break;
                }
                off += len;
            }
        }
    }

    /// Sends one request and reads the one message that answers it.
    fn request(&mut self, req: RouteNetlinkMessage, flags: u16) -> io::Result<NetlinkMessage<RouteNetlinkMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut hdr = NetlinkHeader::default();
        hdr.flags = flags;
        hdr.sequence_number = self.seq;
        let mut msg = NetlinkMessage::new(hdr, NetlinkPayload::from(req));
        msg.finalize();
        let mut out = vec![0u8; msg.header.length as usize];
        msg.serialize(&mut out);
        self.sock.send(&out, 0)?;
        let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
        NetlinkMessage::deserialize(&self.buf[..n])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("netlink: {e}")))
    }

    /// Every neighbour entry with a link-layer address the kernel considers
    /// usable (not INCOMPLETE or FAILED).
    pub fn neighbours(&mut self, out: &mut Vec<Neighbour>) -> io::Result<()> {
        out.clear();
        self.dump(RouteNetlinkMessage::GetNeighbour(NeighbourMessage::default()), |m| {
            if let RouteNetlinkMessage::NewNeighbour(n) = m
                && let NeighbourChange::Usable(n) = NeighbourChange::of(&n, true)
            {
                out.push(n);
            }
        })
    }

    /// The unicast routes of the main table that go through a router
    /// (`ip route add P via H`, or what a routing daemon installs) on one
    /// of `oifs`, IPv4 and IPv6, sorted. The kernel filters by interface
    /// (strict dump checking): the TUN's routes, one per tunnelled prefix
    /// (100,000 in a big mesh), are never copied out.
    pub fn gateway_routes(&mut self, oifs: &[u32]) -> io::Result<Vec<GatewayRoute>> {
        self.sock.set_netlink_get_strict_chk(true)?;
        let mut out = Vec::new();
        let mut result = Ok(());
        'dumps: for oif in oifs {
            for family in [AddressFamily::Inet, AddressFamily::Inet6] {
                let mut rm = RouteMessage::default();
                rm.header.address_family = family;
                rm.header.table = 254;
                rm.attributes.push(RouteAttribute::Oif(*oif));
                if let Err(e) = self.gateway_routes_of(rm, &mut out) {
                    result = Err(e);
                    break 'dumps;
                }
            }
        }
        self.sock.set_netlink_get_strict_chk(false)?;
        result?;
        out.sort_by_key(|r| (r.prefix.addr(), r.prefix.prefix_len()));
        out.dedup();
        Ok(out)
    }

    fn gateway_routes_of(&mut self, req: RouteMessage, out: &mut Vec<GatewayRoute>) -> io::Result<()> {
        self.dump(RouteNetlinkMessage::GetRoute(req), |m| {
            let RouteNetlinkMessage::NewRoute(r) = m else { return };
            if route_table(&r) != 254 || r.header.kind != RouteType::Unicast {
                return;
            }
            let mut oif = 0;
            let mut gw = None;
            let mut hops = Vec::new();
            for a in &r.attributes {
                match a {
                    RouteAttribute::Oif(i) => oif = *i,
                    RouteAttribute::Gateway(g) => gw = route_ip(g),
                    RouteAttribute::MultiPath(nhs) => {
                        for nh in nhs {
                            let g = nh.attributes.iter().find_map(|a| match a {
                                RouteAttribute::Gateway(g) => route_ip(g),
                                _ => None,
                            });
                            if let Some(g) = g {
                                hops.push((nh.interface_index, g));
                            }
                        }
                    }
                    _ => {}
                }
            }
            if let Some(g) = gw {
                hops.push((oif, g));
            }
            if !hops.is_empty()
                && let Some(prefix) = route_prefix(&r)
            {
                hops.sort();
                out.push(GatewayRoute { prefix, hops });
            }
        })
    }

    /// The kernel's route to `dst` (like `ip route get`): output interface,
    /// next-hop gateway if any, and preferred source address.
    pub fn route_get(&mut self, dst: IpAddr) -> io::Result<Option<RouteInfo>> {
        let mut rm = RouteMessage::default();
        let (fam, addr, len) = match dst {
            IpAddr::V4(a) => (AddressFamily::Inet, RouteAddress::Inet(a), 32),
            IpAddr::V6(a) => (AddressFamily::Inet6, RouteAddress::Inet6(a), 128),
        };
        rm.header.address_family = fam;
        rm.header.destination_prefix_length = len;
        rm.attributes.push(RouteAttribute::Destination(addr));
        let m = self.request(RouteNetlinkMessage::GetRoute(rm), NLM_F_REQUEST)?;
        let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(r)) = m.payload else {
            return Ok(None);
        };
        let mut info = RouteInfo {
            oif: 0,
            gateway: None,
            src: None,
        };
        for a in &r.attributes {
            match a {
                RouteAttribute::Oif(i) => info.oif = *i,
                RouteAttribute::Gateway(g) => info.gateway = route_ip(g),
                RouteAttribute::PrefSource(p) => info.src = route_ip(p),
                _ => {}
            }
        }
        Ok((info.oif != 0).then_some(info))
    }

    /// The state of interface `ifindex` as the kernel reports it now;
    /// None when there is no such interface.
    pub fn link_state(&mut self, ifindex: u32) -> io::Result<Option<LinkState>> {
        let mut lm = LinkMessage::default();
        lm.header.index = ifindex;
        let m = self.request(RouteNetlinkMessage::GetLink(lm), NLM_F_REQUEST)?;
        match m.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => Ok(Some(LinkState {
                name: l
                    .attributes
                    .iter()
                    .find_map(|a| match a {
                        LinkAttribute::IfName(n) => Some(n.clone()),
                        _ => None,
                    })
                    .unwrap_or_else(|| format!("ifindex {ifindex}")),
                up: l.header.flags.contains(LinkFlags::Up),
                carrier: l.header.flags.contains(LinkFlags::LowerUp),
            })),
            NetlinkPayload::Error(e) if e.code.is_some_and(|c| c.get() == -libc::ENODEV) => Ok(None),
            NetlinkPayload::Error(e) if e.code.is_some() => Err(e.to_io()),
            _ => Ok(None),
        }
    }

    /// Adds (`add`: create or replace) or deletes the route of each of
    /// `nets` through `oif` in the main table, like `ip route replace|del
    /// NET dev IF`, many per send: only the last of a send asks for an
    /// acknowledgement, failures answer on their own (rtnetlink handles a
    /// send's messages in order before the send returns). Returns the
    /// first failure with its prefix, at once or, with `force` (a clean-up
    /// deleting what may be gone), after going on with the rest. `events`
    /// absorbs the changes' notifications between sends.
    pub fn dev_routes(
        &mut self,
        add: bool,
        nets: &[IpNet],
        oif: u32,
        force: bool,
        mut events: Option<&mut RoutingEvents>,
    ) -> io::Result<()> {
        use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE};
        use netlink_packet_route::route::{RouteProtocol, RouteScope};
        const PER_SEND: usize = 512;
        let mut out = Vec::with_capacity(PER_SEND * 64);
        let mut failed: Option<io::Error> = None;
        for chunk in nets.chunks(PER_SEND) {
            out.clear();
            let first = self.seq.wrapping_add(1);
            for (i, net) in chunk.iter().enumerate() {
                self.seq = self.seq.wrapping_add(1);
                let mut rm = RouteMessage::default();
                rm.header.address_family = if net.addr().is_ipv4() {
                    AddressFamily::Inet
                } else {
                    AddressFamily::Inet6
                };
                rm.header.destination_prefix_length = net.prefix_len();
                rm.header.table = 254;
                rm.header.protocol = RouteProtocol::Boot;
                rm.header.scope = RouteScope::Link;
                rm.header.kind = RouteType::Unicast;
                rm.attributes.push(RouteAttribute::Destination(match net.network() {
                    IpAddr::V4(a) => RouteAddress::Inet(a),
                    IpAddr::V6(a) => RouteAddress::Inet6(a),
                }));
                rm.attributes.push(RouteAttribute::Oif(oif));
                let mut hdr = NetlinkHeader::default();
                hdr.flags = NLM_F_REQUEST;
                if i + 1 == chunk.len() {
                    hdr.flags |= NLM_F_ACK;
                }
                if add {
                    hdr.flags |= NLM_F_CREATE | NLM_F_REPLACE;
                }
                hdr.sequence_number = self.seq;
                let body = if add {
                    RouteNetlinkMessage::NewRoute(rm)
                } else {
                    RouteNetlinkMessage::DelRoute(rm)
                };
                let mut msg = NetlinkMessage::new(hdr, NetlinkPayload::from(body));
                msg.finalize();
                let at = out.len();
                out.resize(at + msg.header.length as usize, 0);
                msg.serialize(&mut out[at..]);
            }
            self.sock.send(&out, 0)?;
            let last = self.seq;
            self.read_until(|m| {
                let seq = m.header.sequence_number;
                let NetlinkPayload::Error(e) = &m.payload else {
                    return Ok(false);
                };
                if e.code.is_some() && failed.is_none() {
                    let net = chunk.get(seq.wrapping_sub(first) as usize);
                    let err = e.to_io();
                    let what = if add { "adding" } else { "deleting" };
                    failed = Some(io::Error::new(
                        err.kind(),
                        format!("{what} {}: {err}", net.map_or(String::new(), |n| n.to_string())),
                    ));
                }
                Ok(seq == last)
            })?;
            if let Some(ev) = events.as_deref_mut() {
                ev.absorb();
            }
            if failed.is_some() && !force {
                break;
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Asks the kernel to resolve `ip` on `ifindex` (ARP or NDP), as a
    /// packet to it would (NTF_USE). Non-default VNETs use this: their
    /// packets never go through the kernel's routing, but the kernel's
    /// neighbour tables are per interface, so they serve every VNET.
    pub fn resolve(&mut self, ifindex: u32, ip: IpAddr) -> io::Result<()> {
        use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE};
        use netlink_packet_route::neighbour::NeighbourFlags;
        let mut nm = NeighbourMessage::default();
        nm.header.family = if ip.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        nm.header.ifindex = ifindex;
        nm.header.flags = NeighbourFlags::Use;
        nm.header.state = NeighbourState::None;
        nm.attributes.push(NeighbourAttribute::Destination(match ip {
            IpAddr::V4(a) => NeighbourAddress::Inet(a),
            IpAddr::V6(a) => NeighbourAddress::Inet6(a),
        }));
        let m = self.request(
            RouteNetlinkMessage::NewNeighbour(nm),
            NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK,
        )?;
        match m.payload {
            NetlinkPayload::Error(e) if e.code.is_some() => Err(e.to_io()),
            _ => Ok(()),
        }
    }

    /// The addresses (with their prefix) configured on `ifindex`, skipping
    /// link-local ones.
    pub fn addresses(&mut self, ifindex: u32) -> io::Result<Vec<IpNet>> {
        let mut v = Vec::new();
        self.dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()), |m| {
            let RouteNetlinkMessage::NewAddress(a) = m else { return };
            if a.header.index != ifindex || a.header.scope == AddressScope::Link || a.header.scope == AddressScope::Host
            {
                return;
            }
            let fam_ok = matches!(a.header.family, AddressFamily::Inet | AddressFamily::Inet6);
            let addr = a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = addr.or_else(|| {
                a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let (true, Some(ip)) = (fam_ok, addr)
                && let Ok(n) = IpNet::new(ip, a.header.prefix_len)
            {
                v.push(n);
            }
        })?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A route message as the kernel sends it for `ip route add|del`.
    fn route(dst: &str, table: u8, kind: RouteType, attrs: Vec<RouteAttribute>) -> RouteMessage {
        let net: IpNet = dst.parse().unwrap();
        let mut r = RouteMessage::default();
        r.header.address_family = if net.addr().is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        r.header.destination_prefix_length = net.prefix_len();
        r.header.table = table;
        r.header.kind = kind;
        if net.prefix_len() > 0 {
            r.attributes.push(RouteAttribute::Destination(match net.addr() {
                IpAddr::V4(a) => RouteAddress::Inet(a),
                IpAddr::V6(a) => RouteAddress::Inet6(a),
            }));
        }
        r.attributes.extend(attrs);
        r
    }

    fn gw(a: &str) -> RouteAttribute {
        RouteAttribute::Gateway(RouteAddress::Inet(a.parse().unwrap()))
    }

    const TUN: u32 = 9;
    const LAN: u32 = 3;
    const UPLINK: u32 = 4;

    fn news(routes: &[RouteMessage]) -> RouteNews {
        let mut n = RouteNews::default();
        for r in routes {
            n.note(r, TUN, &[LAN], &[SUBNETS.parse().unwrap()]);
        }
        n
    }

    /// The default VNET's LAN subnets in these cases.
    const SUBNETS: &str = "10.1.0.0/16";

    #[test]
    fn only_routes_the_fib_is_built_from_rebuild_it() {
        use RouteAttribute::Oif;
        let uni = RouteType::Unicast;
        // Ours: no news at all.
        assert_eq!(
            news(&[route("100.64.0.0/28", 254, uni, vec![Oif(TUN)])]),
            RouteNews::default()
        );
        // Inside a LAN subnet, in the main table: through a router on the
        // LAN, or replaced by a route elsewhere (the event says only where
        // it goes now), the FIB follows.
        let n = news(&[route("10.1.5.0/24", 254, uni, vec![gw("10.1.0.254"), Oif(LAN)])]);
        assert!(n.fib);
        assert_eq!(n.prefixes, vec!["10.1.5.0/24".parse::<IpNet>().unwrap()]);
        assert!(news(&[route("10.1.5.0/24", 254, uni, vec![gw("192.0.2.2"), Oif(UPLINK)])]).fib);
        let hop = |oif| {
            let mut h = netlink_packet_route::route::RouteNextHop::default();
            h.interface_index = oif;
            h.attributes = vec![gw("10.1.0.253")];
            h
        };
        let ecmp = RouteAttribute::MultiPath(vec![hop(UPLINK), hop(LAN)]);
        assert!(news(&[route("10.1.8.0/24", 254, uni, vec![ecmp])]).fib);
        // A LAN address (its local route): the FIB's own addresses.
        assert!(news(&[route("10.1.0.1/32", 255, RouteType::Local, vec![Oif(LAN)])]).fib);
        // A nexthop object does not say where it leads.
        let nh = RouteAttribute::Other(netlink_packet_utils::nla::DefaultNla::new(
            30,
            7u32.to_ne_bytes().to_vec(),
        ));
        assert!(news(&[route("10.7.0.0/16", 254, uni, vec![nh])]).fib);
        // Not the FIB's: a LAN router's route outside the subnets (the
        // kernel's alone), the uplink's routes, another table, a blackhole.
        let n = news(&[
            route("10.9.0.0/16", 254, uni, vec![gw("10.1.0.254"), Oif(LAN)]),
            route("198.51.100.0/24", 254, uni, vec![gw("192.0.2.2"), Oif(UPLINK)]),
            route("10.1.5.0/24", 100, uni, vec![gw("10.1.0.254"), Oif(LAN)]),
            route("203.0.113.0/24", 254, RouteType::BlackHole, vec![]),
        ]);
        assert!(!n.fib, "{n:?}");
        assert_eq!(n.prefixes.len(), 4, "{n:?}");
        assert!(n.touches("198.51.100.7".parse().unwrap()));
        assert!(n.touches("203.0.113.1".parse().unwrap()));
        assert!(!n.touches("192.0.2.2".parse().unwrap()), "no changed route covers it");
        // The default route covers every address.
        let default = route("0.0.0.0/0", 254, uni, vec![gw("192.0.2.3"), Oif(UPLINK)]);
        assert!(news(&[default]).touches("8.8.8.8".parse().unwrap()));
    }

    #[test]
    fn past_max_prefixes_every_route_may_have_changed() {
        let many: Vec<RouteMessage> = (0..=RouteNews::MAX)
            .map(|i| {
                route(
                    &format!("198.18.{i}.0/24"),
                    254,
                    RouteType::Unicast,
                    vec![RouteAttribute::Oif(UPLINK)],
                )
            })
            .collect();
        let n = news(&many[..RouteNews::MAX]);
        assert!(!n.all && n.prefixes.len() == RouteNews::MAX);
        assert!(!n.touches("10.0.0.1".parse().unwrap()));
        let mut n = news(&many);
        assert!(n.all && n.prefixes.is_empty());
        assert!(n.touches("10.0.0.1".parse().unwrap()));
        // The same prefix twice is one.
        n = news(&[many[0].clone(), many[0].clone()]);
        assert_eq!(n.prefixes.len(), 1);
        // Merged: held news and new news.
        let mut held = news(&many[..RouteNews::MAX]);
        held.merge(news(&many[RouteNews::MAX..]));
        assert!(held.all);
    }

    #[test]
    fn loopback_is_found_and_missing_is_none() {
        let lo = link_by_name("lo").unwrap().expect("lo exists");
        assert_eq!(lo.ifindex, 1);
        assert!(link_by_name("no-such-if0").unwrap().is_none());
    }

    #[test]
    fn loopback_is_up_with_carrier_and_a_missing_link_is_none() {
        let mut nl = Netlink::open().unwrap();
        let lo = nl.link_state(1).unwrap().expect("lo exists");
        assert_eq!(
            lo,
            LinkState {
                name: "lo".into(),
                up: true,
                carrier: true
            }
        );
        assert_eq!(nl.link_state(i32::MAX as u32).unwrap(), None);
    }

    #[test]
    fn dumps_work_without_privileges() {
        let mut nl = Netlink::open().unwrap();
        let mut n = Vec::new();
        nl.neighbours(&mut n).unwrap();
        // lo has 127.0.0.1/8 but it is host scope; the dump itself must succeed.
        let _ = nl.addresses(1).unwrap();
        // The kernel accepts the filtered route dumps (strict checking),
        // and the socket answers plain dumps again afterwards.
        assert_eq!(nl.gateway_routes(&[1]).unwrap(), vec![]);
        nl.neighbours(&mut n).unwrap();
    }
}
