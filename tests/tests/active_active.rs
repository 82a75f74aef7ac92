//! Active/active: two subway gateways for one site, both carrying traffic,
//! behind the site's LAN router, which learns from each by BGP (with BFD)
//! what it can serve and spreads flows over both (ECMP). subway exports
//! the prefixes into a kernel table of its own ([Export]); BIRD on each
//! gateway announces that table; BIRD on the LAN router installs the ECMP
//! route. The far side is a subway gateway with both as a route group.
//!
//! ```text
//!                                  ┌ lan0 [g1] wan0 ┐  10.1.0.11 / 192.0.2.11  (BIRD, AS 65001)
//!  a 10.1.5.2 ─ r (BIRD, AS 65000) ┤                ├─ inet ─ wan0 [fb] lan0 ─ b 10.2.0.2
//!               10.1.5.1  10.1.0.254└ lan0 [g2] wan0 ┘  10.1.0.12 / 192.0.2.12   192.0.2.2  10.2.0.1
//! ```

use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::time::Duration;
use subway_testkit::{
    Bird, Capture, Netns, Subway, UdpFlow, ping_until, require_root, udp_ports_to, veth, wait_until, wg_keypair,
};

struct Site {
    a: Netns,
    r: Netns,
    g: [Netns; 2],
    _inet: Netns,
    fb: Netns,
    b: Netns,
    kg: [(String, String); 2],
    kf: (String, String),
}

impl Site {
    fn new() -> Result<Site> {
        let t = Site {
            a: Netns::new("a")?,
            r: Netns::new("r")?,
            g: [Netns::new("g1")?, Netns::new("g2")?],
            _inet: Netns::new("in")?,
            fb: Netns::new("fb")?,
            b: Netns::new("b")?,
            kg: [wg_keypair()?, wg_keypair()?],
            kf: wg_keypair()?,
        };
        let inet = &t._inet;
        inet.sh("ip link add br0 type bridge && ip link set br0 up")?;
        t.r.sh("ip link add br0 type bridge && ip link set br0 up && ip addr add 10.1.0.254/24 dev br0")?;
        veth(&t.a, "eth0", &t.r, "eth1")?;
        t.a.sh("ip addr add 10.1.5.2/24 dev eth0 && ip route add default via 10.1.5.1")?;
        t.r.sh("ip addr add 10.1.5.1/24 dev eth1")?;
        t.r.sysctl("net.ipv4.ip_forward", "1")?;
        // Flows, not packets, spread over the ECMP route.
        t.r.sysctl("net.ipv4.fib_multipath_hash_policy", "1")?;
        for (i, g) in t.g.iter().enumerate() {
            let n = i + 1;
            veth(g, "lan0", &t.r, &format!("p{n}"))?;
            veth(g, "wan0", inet, &format!("p{n}"))?;
            t.r.run(&["ip", "link", "set", &format!("p{n}"), "master", "br0"])?;
            inet.run(&["ip", "link", "set", &format!("p{n}"), "master", "br0"])?;
            g.sh(&format!(
                "ip addr add 10.1.0.1{n}/24 dev lan0 && ip addr add 192.0.2.1{n}/24 dev wan0 && \
                 ip route add 10.1.5.0/24 via 10.1.0.254 dev lan0"
            ))?;
            g.sysctl("net.ipv4.ip_forward", "1")?;
        }
        veth(&t.fb, "wan0", inet, "pf")?;
        inet.run(&["ip", "link", "set", "pf", "master", "br0"])?;
        veth(&t.b, "eth0", &t.fb, "lan0")?;
        t.fb.sh("ip addr add 192.0.2.2/24 dev wan0 && ip addr add 10.2.0.1/24 dev lan0")?;
        t.fb.sysctl("net.ipv4.ip_forward", "1")?;
        t.b.sh("ip addr add 10.2.0.2/24 dev eth0 && ip route add default via 10.2.0.1")?;
        Ok(t)
    }

    /// Gateway i: the site's LAN (and the prefix behind the LAN router),
    /// the far gateway as its peer, the export table for BIRD.
    fn config_g(&self, i: usize) -> String {
        format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\nUplink = wan0\n\n\
             [Lan]\nInterface = lan0\nSubnets = 10.1.0.0/24, 10.1.5.0/24\n\n\
             [Peer]\nPublicKey = {}\nEndpoint = 192.0.2.2:51820\nAllowedIPs = 10.2.0.0/24\n\n\
             [Export]\nTable = 100\nDrainSeconds = 1\n",
            self.kg[i].0, self.kf.1
        )
    }

    /// The far gateway: both site gateways as an ECMP route group.
    fn config_fb(&self) -> String {
        let mut s = format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\nUplink = wan0\n\n[Lan]\nInterface = lan0\n",
            self.kf.0
        );
        for (i, k) in self.kg.iter().enumerate() {
            let n = i + 1;
            s += &format!(
                "\n[Peer]\nPublicKey = {}\nEndpoint = 192.0.2.1{n}:51820\nAllowedIPs = 10.1.0.0/16\n\
                 Priority = 100\nProbe = 10.1.0.1{n}\nProbeInterval = 100\n",
                k.1
            );
        }
        s
    }
}

/// BIRD on a gateway: table 100 (subway's) announced to the LAN router,
/// with BFD at 100 ms.
fn bird_gateway(n: usize) -> String {
    format!(
        "log stderr all;\nrouter id 10.1.0.1{n};\nprotocol device {{ scan time 1; }}\n\
         protocol kernel subway {{ ipv4 {{ import all; export none; }}; kernel table 100; learn; scan time 1; }}\n\
         protocol bfd {{ interface \"lan0\" {{ interval 100 ms; multiplier 3; }}; }}\n\
         protocol bgp lan_router {{ local 10.1.0.1{n} as 65001; neighbor 10.1.0.254 as 65000; bfd on; \
         connect retry time 1; ipv4 {{ import none; export where proto = \"subway\"; next hop self; }}; }}\n"
    )
}

/// BIRD on the LAN router: both gateways as BGP neighbours, equal routes
/// merged into one ECMP route in the kernel.
fn bird_router() -> String {
    let mut s = "log stderr all;\nrouter id 10.1.0.254;\nprotocol device { scan time 1; }\n\
                 protocol kernel { ipv4 { import none; export all; }; merge paths on; }\n\
                 protocol bfd { interface \"br0\" { interval 100 ms; multiplier 3; }; }\n"
        .to_string();
    for n in 1..=2 {
        s += &format!(
            "protocol bgp g{n} {{ local 10.1.0.254 as 65000; neighbor 10.1.0.1{n} as 65001; bfd on; \
             connect retry time 1; ipv4 {{ import all; export none; }}; }}\n"
        );
    }
    s
}

/// The LAN router's next hops toward the far site.
fn router_next_hops(t: &Site) -> Vec<String> {
    let out = t.r.run(&["ip", "route", "show", "10.2.0.0/24"]).unwrap_or_default();
    let mut v: Vec<String> = out
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "via")
        .map(|w| w[1].to_string())
        .collect();
    v.sort();
    v
}

/// Everything running: the far gateway, both site gateways with BIRD,
/// the LAN router's BIRD and its ECMP route over both.
struct Up {
    _fb: Subway,
    _router: Bird,
    g: Vec<Subway>,
    _birds: Vec<Bird>,
}

fn site_up(t: &Site) -> Result<Up> {
    let fb = Subway::start(&t.fb, &t.config_fb())?;
    let g = vec![
        Subway::start(&t.g[0], &t.config_g(0))?,
        Subway::start(&t.g[1], &t.config_g(1))?,
    ];
    let router = Bird::start(&t.r, &bird_router())?;
    let birds = vec![
        Bird::start(&t.g[0], &bird_gateway(1))?,
        Bird::start(&t.g[1], &bird_gateway(2))?,
    ];
    wait_until(
        "the LAN router has an ECMP route over both gateways",
        Duration::from_secs(30),
        || Ok(router_next_hops(t) == ["10.1.0.11", "10.1.0.12"]),
    )
    .with_context(|| {
        format!(
            "{}\n{}\n{}",
            router.cli(&["show", "protocols", "all"]).unwrap_or_default(),
            g[0].diag(),
            t.r.run(&["ip", "route"]).unwrap_or_default()
        )
    })?;
    ping_until(&t.a, "10.2.0.2", 10)?;
    Ok(Up {
        _fb: fb,
        _router: router,
        g,
        _birds: birds,
    })
}

/// 16 flows of `count` datagrams at 200/s from the LAN host, and where
/// each went (the LAN router's bridge port toward g1 or g2) after `settle`.
struct Flows {
    flows: Vec<UdpFlow>,
    caps: [Capture; 2],
}

impl Flows {
    fn start(t: &Site, count: u32) -> Result<Flows> {
        let caps = [
            Capture::start(&t.r, "p1", "udp and dst host 10.2.0.2")?,
            Capture::start(&t.r, "p2", "udp and dst host 10.2.0.2")?,
        ];
        let flows = (0..16u16)
            .map(|i| UdpFlow::start(&t.a, &t.b, format!("10.2.0.2:{}", 7400 + i).parse()?, count, 200, 64))
            .collect::<Result<Vec<_>>>()?;
        Ok(Flows { flows, caps })
    }

    /// The ports seen so far through g1 and g2.
    fn placement(&self) -> Result<[BTreeMap<u16, u32>; 2]> {
        Ok([
            udp_ports_to(&self.caps[0].packets()?, "10.2.0.2"),
            udp_ports_to(&self.caps[1].packets()?, "10.2.0.2"),
        ])
    }

    fn finish(self) -> Result<Vec<subway_testkit::FlowReport>> {
        self.flows.into_iter().map(|f| f.finish()).collect()
    }
}

#[test]
fn two_gateways_share_the_site_by_bgp_ecmp_and_a_killed_ones_flows_move() -> Result<()> {
    if !require_root("two_gateways_share_the_site_by_bgp_ecmp_and_a_killed_ones_flows_move") {
        return Ok(());
    }
    let t = Site::new()?;
    let mut up = site_up(&t)?;
    let flows = Flows::start(&t, 1400)?;
    std::thread::sleep(Duration::from_millis(2500));
    let [on1, on2] = flows.placement()?;
    let tx = |gw: &Subway| gw.total("tunnel_tx").unwrap_or(0);
    let (tx1, tx2) = (tx(&up.g[0]), tx(&up.g[1]));
    // SIGKILL to g1's subway, by its pid: its TUN goes, and with it the
    // routes in table 100; BIRD withdraws them.
    let g1 = up.g.remove(0);
    let mut proc1 = g1.proc;
    t.g[0].run(&["kill", "-KILL", &proc1.pid().to_string()])?;
    let reports = flows.finish()?;
    while proc1.alive() {
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("before the kill: g1 carried {on1:?}, g2 {on2:?}; tunnel_tx g1 {tx1}, g2 {tx2}");
    assert!(
        !on1.is_empty() && !on2.is_empty(),
        "16 flows on one gateway: g1 {on1:?} g2 {on2:?}"
    );
    assert!(tx1 > 500 && tx2 > 500, "both gateways' counters: g1 {tx1}, g2 {tx2}");
    let mut worst = Duration::ZERO;
    for (i, r) in reports.iter().enumerate() {
        let port = 7400 + i as u16;
        assert!(
            on1.contains_key(&port) != on2.contains_key(&port),
            "flow {port} on both or neither"
        );
        if on2.contains_key(&port) {
            assert_eq!(r.lost, 0, "flow {port} on the surviving gateway lost packets: {r:?}");
        } else {
            worst = worst.max(r.longest_gap());
        }
    }
    eprintln!(
        "g1 SIGKILLed: its flows moved to g2 with a longest gap of {:.0} ms; g2's flows lost nothing",
        worst.as_secs_f64() * 1e3
    );
    assert!(worst < Duration::from_millis(500), "longest gap {worst:?}");
    assert_eq!(router_next_hops(&t), ["10.1.0.12"]);

    // Restarted, g1 is announced again as soon as it has a session.
    let t0 = std::time::Instant::now();
    let g1 = Subway::start_as(&t.g[0], &g1.name, &t.config_g(0))?;
    wait_until("g1 is announced again", Duration::from_secs(10), || {
        Ok(router_next_hops(&t) == ["10.1.0.11", "10.1.0.12"])
    })
    .with_context(|| g1.diag())?;
    eprintln!(
        "g1 restarted: announced again {:.0} ms after its start",
        t0.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

#[test]
fn a_drained_or_cleanly_stopped_gateway_loses_no_packet() -> Result<()> {
    if !require_root("a_drained_or_cleanly_stopped_gateway_loses_no_packet") {
        return Ok(());
    }
    let t = Site::new()?;
    let mut up = site_up(&t)?;
    // `subway drain`: g1's routes are withdrawn, the router moves its
    // flows to g2, g1 forwards what is still in flight.
    let flows = Flows::start(&t, 1400)?;
    std::thread::sleep(Duration::from_millis(1500));
    let out = up.g[0].ctl(&["drain", &up.g[0].name])?;
    assert!(out.contains("10.2.0.0/24"), "{out}");
    wait_until("the router leaves g1", Duration::from_secs(5), || {
        Ok(router_next_hops(&t) == ["10.1.0.12"])
    })?;
    let [on1, _] = flows.placement()?;
    let reports = flows.finish()?;
    let lost: u32 = reports.iter().map(|r| r.lost).sum();
    eprintln!("subway drain under 16 flows: lost {lost}; g1 had carried {on1:?}");
    assert!(!on1.is_empty(), "no flow was on g1 to begin with");
    assert_eq!(lost, 0, "{reports:?}");
    up.g[0].ctl(&["drain", &up.g[0].name, "--undo"])?;
    wait_until("g1 is announced again", Duration::from_secs(10), || {
        Ok(router_next_hops(&t) == ["10.1.0.11", "10.1.0.12"])
    })?;

    // A clean stop (SIGTERM) drains by itself first (DrainSeconds = 1).
    let flows = Flows::start(&t, 1400)?;
    std::thread::sleep(Duration::from_millis(1500));
    let g2 = up.g.remove(1);
    let (status, log) = g2.stop();
    assert!(status.is_some_and(|s| s.success()), "{log}");
    assert!(log.contains("routes withdrawn"), "{log}");
    let [_, on2] = flows.placement()?;
    let reports = flows.finish()?;
    let lost: u32 = reports.iter().map(|r| r.lost).sum();
    eprintln!("SIGTERM under 16 flows: lost {lost}; g2 had carried {on2:?}");
    assert!(!on2.is_empty(), "no flow was on g2 to begin with");
    assert_eq!(lost, 0, "{reports:?}");
    assert_eq!(router_next_hops(&t), ["10.1.0.11"]);
    Ok(())
}

#[test]
fn a_gateway_that_drops_off_the_lan_is_dropped_by_bfd() -> Result<()> {
    if !require_root("a_gateway_that_drops_off_the_lan_is_dropped_by_bfd") {
        return Ok(());
    }
    let t = Site::new()?;
    let _up = site_up(&t)?;
    // g1's LAN link is cut at the router's switch: no BGP message can say
    // so; BFD (100 ms, multiplier 3) notices and BIRD withdraws g1.
    let flows = Flows::start(&t, 1400)?;
    std::thread::sleep(Duration::from_millis(2000));
    let [on1, on2] = flows.placement()?;
    t.r.run(&["ip", "link", "set", "p1", "down"])?;
    let reports = flows.finish()?;
    let mut worst = Duration::ZERO;
    for (i, r) in reports.iter().enumerate() {
        let port = 7400 + i as u16;
        if on2.contains_key(&port) {
            assert_eq!(r.lost, 0, "flow {port} on the surviving gateway lost packets: {r:?}");
        } else {
            worst = worst.max(r.longest_gap());
        }
    }
    eprintln!(
        "g1 cut off the LAN: BFD moved its {} flows to g2 with a longest gap of {:.0} ms",
        on1.len(),
        worst.as_secs_f64() * 1e3
    );
    assert!(!on1.is_empty(), "no flow was on g1");
    assert!(worst < Duration::from_millis(500), "longest gap {worst:?}");
    assert_eq!(router_next_hops(&t), ["10.1.0.12"]);
    Ok(())
}
