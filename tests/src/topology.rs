//! Ready-made topologies: [`TwoSubnets`] (two LANs and a gateway between
//! them), [`TwoSites`] (two sites, each behind a gateway, over an
//! "internet" link) and [`SitesOnABridge`] (any number of sites on one
//! segment).

use crate::{Netns, WgPeer, veth, veth_queues, wg_keypair};
use anyhow::Result;

/// Two subnets joined by a gateway namespace:
///
/// ```text
///  a (eth0 10.1.0.2/24 fd01::2/64) ── lan0 [gw] lan1 ── b (eth0 10.2.0.2/24 fd02::2/64)
///                             10.1.0.1 fd01::1   10.2.0.1 fd02::1
/// ```
/// Hosts route everything via the gateway; the gateway forwards (sysctl)
/// so its kernel can serve as the slow path or as the baseline router.
pub struct TwoSubnets {
    pub a: Netns,
    pub gw: Netns,
    pub b: Netns,
}

impl TwoSubnets {
    pub fn new() -> Result<Self> {
        let t = TwoSubnets {
            a: Netns::new("a")?,
            gw: Netns::new("gw")?,
            b: Netns::new("b")?,
        };
        veth(&t.a, "eth0", &t.gw, "lan0")?;
        veth(&t.b, "eth0", &t.gw, "lan1")?;
        t.a.sh("ip addr add 10.1.0.2/24 dev eth0 && ip -6 addr add fd01::2/64 dev eth0 nodad && ip route add default via 10.1.0.1 && ip -6 route add default via fd01::1")?;
        t.b.sh("ip addr add 10.2.0.2/24 dev eth0 && ip -6 addr add fd02::2/64 dev eth0 nodad && ip route add default via 10.2.0.1 && ip -6 route add default via fd02::1")?;
        t.gw.sh("ip addr add 10.1.0.1/24 dev lan0 && ip -6 addr add fd01::1/64 dev lan0 nodad && ip addr add 10.2.0.1/24 dev lan1 && ip -6 addr add fd02::1/64 dev lan1 nodad")?;
        t.gw.sysctl("net.ipv4.ip_forward", "1")?;
        t.gw.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        Ok(t)
    }

    /// The routed-mode config for the gateway (subnets from its addresses).
    pub fn routed_config(&self, tuning: &str) -> String {
        format!("[Lan]\nInterface = lan0\n\n[Lan]\nInterface = lan1\n\n[Tuning]\n{tuning}\n")
    }
}

/// Two sites joined over an "internet" link:
///
/// ```text
///  a (10.1.0.2 fd01::2) ─ lan0 [gwa] wan0 ══ wan0 [gwb] lan0 ─ b (10.2.0.2 fd02::2)
///                          10.1.0.1   192.0.2.1   192.0.2.2   10.2.0.1
///                          fd01::1    2001:db8::1 2001:db8::2 fd02::1
/// ```
/// The gateways do not forward between their LAN and the internet by
/// themselves for the remote site: nothing but the tunnel reaches the far
/// subnet (their kernels have no route to it).
pub struct TwoSites {
    pub a: Netns,
    pub gwa: Netns,
    pub gwb: Netns,
    pub b: Netns,
    pub keys_a: (String, String),
    pub keys_b: (String, String),
}

impl TwoSites {
    pub fn new() -> Result<Self> {
        Self::with_queues(1)
    }

    /// The same sites on veths of `queues` queues each (one worker per
    /// queue in each gateway).
    pub fn with_queues(queues: u32) -> Result<Self> {
        let t = TwoSites {
            a: Netns::new("a")?,
            gwa: Netns::new("ga")?,
            gwb: Netns::new("gb")?,
            b: Netns::new("b")?,
            keys_a: wg_keypair()?,
            keys_b: wg_keypair()?,
        };
        veth_queues(&t.a, "eth0", &t.gwa, "lan0", queues)?;
        veth_queues(&t.gwa, "wan0", &t.gwb, "wan0", queues)?;
        veth_queues(&t.b, "eth0", &t.gwb, "lan0", queues)?;
        t.a.sh("ip addr add 10.1.0.2/24 dev eth0 && ip -6 addr add fd01::2/64 dev eth0 nodad && ip route add default via 10.1.0.1 && ip -6 route add default via fd01::1")?;
        t.b.sh("ip addr add 10.2.0.2/24 dev eth0 && ip -6 addr add fd02::2/64 dev eth0 nodad && ip route add default via 10.2.0.1 && ip -6 route add default via fd02::1")?;
        t.gwa.sh("ip addr add 10.1.0.1/24 dev lan0 && ip -6 addr add fd01::1/64 dev lan0 nodad && ip addr add 192.0.2.1/24 dev wan0 && ip -6 addr add 2001:db8::1/64 dev wan0 nodad")?;
        t.gwb.sh("ip addr add 10.2.0.1/24 dev lan0 && ip -6 addr add fd02::1/64 dev lan0 nodad && ip addr add 192.0.2.2/24 dev wan0 && ip -6 addr add 2001:db8::2/64 dev wan0 nodad")?;
        for gw in [&t.gwa, &t.gwb] {
            gw.sysctl("net.ipv4.ip_forward", "1")?;
            gw.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }
        Ok(t)
    }

    /// Gateway A as an operator's box: forwarding off (as on a fresh
    /// Debian install) and a default route to the internet (B's uplink),
    /// so that anything the kernel sends in clear is not dropped for want
    /// of a route but leaves, where a capture on B's uplink sees it.
    pub fn a_as_a_fresh_box_with_a_default_route(&self) -> Result<()> {
        self.gwa.sysctl("net.ipv4.ip_forward", "0")?;
        self.gwa.sysctl("net.ipv6.conf.all.forwarding", "0")?;
        self.gwa
            .sh("ip route add default via 192.0.2.2 && ip -6 route add default via 2001:db8::2")?;
        Ok(())
    }

    /// subway's config for gateway A (`for_a`) or B; `endpoint_v6` puts the
    /// tunnel on IPv6 outside.
    pub fn subway_config(&self, for_a: bool, endpoint_v6: bool, extra_peer: &str) -> String {
        let (me, peer) = if for_a {
            (&self.keys_a, &self.keys_b)
        } else {
            (&self.keys_b, &self.keys_a)
        };
        let (remote4, remote6, remote_net4, remote_net6) = if for_a {
            ("192.0.2.2", "2001:db8::2", "10.2.0.0/24", "fd02::/64")
        } else {
            ("192.0.2.1", "2001:db8::1", "10.1.0.0/24", "fd01::/64")
        };
        let endpoint = if endpoint_v6 {
            format!("[{remote6}]:51820")
        } else {
            format!("{remote4}:51820")
        };
        format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\nUplink = wan0\n\n[Lan]\nInterface = lan0\n\n\
             [Peer]\nPublicKey = {}\nEndpoint = {endpoint}\nAllowedIPs = {remote_net4}, {remote_net6}\n{extra_peer}\n",
            me.0, peer.1
        )
    }

    /// Gateway B as a standard WireGuard box (`impl_`) instead of subway.
    pub fn standard_b(&self, impl_: &str) -> Result<WgPeer> {
        self.standard(impl_, false)
    }

    /// Gateway A (`for_a`) or B as a standard WireGuard box (`impl_`).
    pub fn standard(&self, impl_: &str, for_a: bool) -> Result<WgPeer> {
        if for_a {
            WgPeer::start(
                impl_,
                &self.gwa,
                &self.keys_a.0,
                51820,
                &self.keys_b.1,
                "192.0.2.2:51820",
                &["10.2.0.0/24", "fd02::/64"],
            )
        } else {
            WgPeer::start(
                impl_,
                &self.gwb,
                &self.keys_b.0,
                51820,
                &self.keys_a.1,
                "192.0.2.1:51820",
                &["10.1.0.0/24", "fd01::/64"],
            )
        }
    }
}

/// Sites on one "internet" segment (a bridge in namespace `inet`): site i
/// (1-based) has a host 10.i.0.2 behind gateway 10.i.0.1, whose uplink is
/// 192.0.2.i/24. The gateways forward (as wg-quick boxes are set up).
pub struct SitesOnABridge {
    pub inet: Netns,
    pub hosts: Vec<Netns>,
    pub gws: Vec<Netns>,
}

impl SitesOnABridge {
    pub fn new(n: u8) -> Result<Self> {
        let inet = Netns::new("in")?;
        inet.sh("ip link add br0 type bridge && ip link set br0 up")?;
        let (mut hosts, mut gws) = (Vec::new(), Vec::new());
        for i in 1..=n {
            let h = Netns::new(&format!("h{i}"))?;
            let g = Netns::new(&format!("g{i}"))?;
            veth(&h, "eth0", &g, "lan0")?;
            veth(&g, "wan0", &inet, &format!("p{i}"))?;
            inet.run(&["ip", "link", "set", &format!("p{i}"), "master", "br0"])?;
            h.sh(&format!(
                "ip addr add 10.{i}.0.2/24 dev eth0 && ip route add default via 10.{i}.0.1"
            ))?;
            g.sh(&format!(
                "ip addr add 10.{i}.0.1/24 dev lan0 && ip addr add 192.0.2.{i}/24 dev wan0"
            ))?;
            g.sysctl("net.ipv4.ip_forward", "1")?;
            hosts.push(h);
            gws.push(g);
        }
        Ok(SitesOnABridge { inet, hosts, gws })
    }
}
