//! Types shared by subway's XDP program and its userspace: map names, keys,
//! values and counter indices. Everything is `#[repr(C)]` plain data so both
//! sides agree on the bytes; the `user` feature adds `aya::Pod` for userspace.
#![cfg_attr(not(test), no_std)]

/// Interfaces the XDP program may be attached to at once.
pub const MAX_IFACES: u32 = 64;
/// RX queues per interface that can have an AF_XDP socket.
pub const MAX_QUEUES: u32 = 64;
/// Entries of the XSKMAP: one slot per (interface slot, queue).
pub const XSK_SLOTS: u32 = MAX_IFACES * MAX_QUEUES;
/// Steering routes per address family (all VNETs together). The LPM
/// tries allocate per entry (BPF_F_NO_PREALLOC), so the bound costs
/// nothing until used: about 100 bytes of kernel memory per route.
pub const MAX_ROUTES: u32 = 262_144;
/// Listen (address, port) pairs the gateway answers WireGuard on.
pub const MAX_LISTEN: u32 = 256;

/// Map names, as the XDP program declares them.
pub mod maps {
    pub const IFACES: &str = "IFACES";
    pub const ROUTES_V4: &str = "ROUTES_V4";
    pub const ROUTES_V6: &str = "ROUTES_V6";
    pub const LISTEN: &str = "LISTEN";
    pub const XSKS: &str = "XSKS";
    pub const COUNTERS: &str = "COUNTERS";
}

/// Name of the XDP program in the object file.
pub const PROGRAM_NAME: &str = "subway_xdp";

/// What the XDP program knows about an interface it is attached to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceConf {
    /// Index of this interface's block in the XSKMAP: `slot * MAX_QUEUES + queue`.
    pub slot: u32,
    /// Routing domain (VNET) whose routes apply to traffic arriving here.
    pub vnet: u32,
    /// The interface's MAC: frames to other unicast MACs (promiscuous
    /// mode, flooding) are not ours to route.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

impl IfaceConf {
    /// The XSKMAP index of this interface's socket on `queue`, or None
    /// for a queue beyond what subway serves (the frame goes to the kernel).
    #[inline(always)]
    pub fn xsk_index(&self, queue: u32) -> Option<u32> {
        if queue >= MAX_QUEUES {
            return None;
        }
        Some(self.slot * MAX_QUEUES + queue)
    }
}

/// LPM key for IPv4: the VNET is matched in full (32 bits), then the prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V4Key {
    pub vnet: u32,
    pub addr: [u8; 4],
}

/// LPM key for IPv6: the VNET is matched in full (32 bits), then the prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct V6Key {
    pub vnet: u32,
    pub addr: [u8; 16],
}

/// LPM prefix length of a key whose address prefix is `plen` bits long.
#[inline(always)]
pub const fn lpm_len(plen: u32) -> u32 {
    32 + plen
}

/// What to do with a packet whose destination matched a route.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Steer {
    /// One of the `STEER_*` actions.
    pub action: u32,
    /// Interface the userspace path will send it out of (0: a tunnel peer).
    /// The XDP program passes traffic that would leave where it came in.
    pub egress_ifindex: u32,
}

/// Redirect to the AF_XDP socket of the ingress queue.
pub const STEER_REDIRECT: u32 = 1;
/// An address of the gateway itself: leave it to the kernel.
pub const STEER_LOCAL: u32 = 2;

/// Key of the listen map: a local address (IPv4 as IPv4-mapped IPv6, all
/// zeros for any address) and a UDP port in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: u16,
}

impl ListenKey {
    #[inline(always)]
    pub fn v4(addr: [u8; 4], port: u16) -> Self {
        let mut a = [0u8; 16];
        a[10] = 0xff;
        a[11] = 0xff;
        a[12] = addr[0];
        a[13] = addr[1];
        a[14] = addr[2];
        a[15] = addr[3];
        ListenKey { addr: a, port, _pad: 0 }
    }
    #[inline(always)]
    pub fn v6(addr: [u8; 16], port: u16) -> Self {
        ListenKey { addr, port, _pad: 0 }
    }
    #[inline(always)]
    pub fn any(port: u16) -> Self {
        ListenKey {
            addr: [0; 16],
            port,
            _pad: 0,
        }
    }
}

/// The VNET of a dedicated uplink: no routes, WireGuard only.
pub const UPLINK_VNET: u32 = u32::MAX;

impl IfaceConf {
    /// An interface of a non-default VNET: the kernel must not route its
    /// traffic (it has one routing table, the default VNET's).
    #[inline(always)]
    pub fn isolated(&self) -> bool {
        self.vnet != 0 && self.vnet != UPLINK_VNET
    }
}

/// Declares a set of counters as an enum: each variant is a counter with
/// the name `subway show`, its JSON and the metrics use, and the enum gets
/// `ALL`, `COUNT` and `name()`. Every counter subway keeps is declared this
/// way (the XDP program's here, the workers' and the control thread's in
/// the dataplane), so there is one style of counter, indexed by variant.
#[macro_export]
macro_rules! named_counters {
    ($(#[$meta:meta])* $vis:vis enum $Enum:ident {
        $( $(#[$doc:meta])* $id:ident = $name:literal ),* $(,)?
    }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        $vis enum $Enum { $( $(#[$doc])* $id ),* }
        impl $Enum {
            pub const ALL: &'static [$Enum] = &[$($Enum::$id),*];
            pub const COUNT: usize = Self::ALL.len();
            /// The name in `subway show`, JSON and metrics.
            pub const fn name(self) -> &'static str {
                match self { $($Enum::$id => $name),* }
            }
        }
        impl $crate::NamedCounter for $Enum {
            const ALL: &'static [Self] = $Enum::ALL;
            fn index(self) -> usize {
                self as usize
            }
            fn name(self) -> &'static str {
                $Enum::name(self)
            }
        }
    };
}

/// What [`named_counters!`] implements: a set of counters, each with an
/// index and a name, for code that counts any such set.
pub trait NamedCounter: Copy + 'static {
    const ALL: &'static [Self];
    fn index(self) -> usize;
    fn name(self) -> &'static str;
}

named_counters! {
    /// Per-CPU counters of the XDP program, one per action and reason.
    #[repr(u32)]
    pub enum XdpCounter {
        /// Every frame the program saw.
        Seen = "seen",
        /// Redirected: destination in a steered prefix.
        RedirectRoute = "redirect_route",
        /// Redirected: UDP to the gateway's listen address and port.
        RedirectListen = "redirect_listen",
        /// Passed: the interface is not one subway configured.
        PassUnknownIface = "pass_unknown_iface",
        /// Passed: not IPv4 or IPv6 (ARP, LLDP, ...).
        PassNotIp = "pass_not_ip",
        /// Passed: headers truncated or inconsistent; the kernel will judge.
        PassMalformed = "pass_malformed",
        /// Passed: multicast or broadcast destination (NDP, DHCP, ...).
        PassMulticast = "pass_multicast",
        /// Passed: no steered prefix matched.
        PassNoRoute = "pass_no_route",
        /// Passed: an address of the gateway itself.
        PassLocal = "pass_local",
        /// Passed: the route leaves through the interface it came in on.
        PassSameIface = "pass_same_iface",
        /// Passed: TTL or hop limit would expire; the kernel sends the ICMP error.
        PassTtlExpired = "pass_ttl_expired",
        /// Passed: no AF_XDP socket on this queue (dataplane down: fail open).
        PassNoSocket = "pass_no_socket",
        /// Passed: destination MAC is another host's.
        PassNotForUs = "pass_not_for_us",
        /// Passed: VLAN-tagged (not routed by the fast path yet).
        PassVlan = "pass_vlan",
        /// Passed: RX queue beyond MAX_QUEUES.
        PassQueueRange = "pass_queue_range",
        /// Passed: a WireGuard handshake or cookie message, for the control thread.
        PassHandshake = "pass_handshake",
        /// Dropped: an interface of a non-default VNET, and no route of that
        /// VNET covers the destination (the kernel's one routing table must
        /// never forward another VNET's packets).
        DropVnetNoRoute = "drop_vnet_no_route",
        /// Dropped: a non-default VNET's packet and no AF_XDP socket to take it.
        DropVnetNoSocket = "drop_vnet_no_socket",
        /// Dropped: on a non-default VNET's interface, addressed to the gateway
        /// itself (or broadcast / multicast other than NDP and MLD). Only ARP
        /// and NDP are answered there: the kernel could reply only through the
        /// default VNET's routing table.
        DropVnetLocal = "drop_vnet_local",
}
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)] structs of integers and byte
    // arrays with no padding holes that could leak uninitialised bytes.
    unsafe impl aya::Pod for super::IfaceConf {}
    unsafe impl aya::Pod for super::V4Key {}
    unsafe impl aya::Pod for super::V6Key {}
    unsafe impl aya::Pod for super::Steer {}
    unsafe impl aya::Pod for super::ListenKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_table_is_complete_and_ordered() {
        for (i, c) in XdpCounter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{} out of place", c.name());
        }
    }

    #[test]
    fn xsk_index_stays_in_its_slot() {
        let c = IfaceConf {
            slot: 3,
            ..Default::default()
        };
        assert_eq!(c.xsk_index(0), Some(3 * MAX_QUEUES));
        assert_eq!(c.xsk_index(MAX_QUEUES - 1), Some(4 * MAX_QUEUES - 1));
        assert_eq!(c.xsk_index(MAX_QUEUES), None);
    }

    #[test]
    fn listen_key_maps_v4() {
        let k = ListenKey::v4([10, 0, 0, 1], 51820);
        assert_eq!(&k.addr[10..], &[0xff, 0xff, 10, 0, 0, 1]);
    }
}
