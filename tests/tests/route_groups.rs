//! Route groups: one far prefix behind two gateways with keys of their
//! own, as two [Peer]s of this gateway sharing the prefix; probed through
//! their tunnels, the prefix moves when the active one dies (priorities),
//! or flows are spread over both and a dead one's flows move (ECMP).
//!
//! ```text
//!                                            ┌ wan0 [b1] lan0 ┐ 192.0.2.11 / 10.2.0.11
//!  a 10.1.0.2 ─ lan0 [ga] wan0 ─ inet (br0) ─┤                b (br0) 10.2.0.2
//!               10.1.0.1  192.0.2.1          └ wan0 [b2] lan0 ┘ 192.0.2.12 / 10.2.0.12
//! ```

use anyhow::{Context, Result};
use std::time::Duration;
use subway_testkit::{
    Capture, Netns, Subway, UdpFlow, ping_until, require_root, udp_ports_to, veth, wait_until, wg_keypair,
};

struct Far {
    a: Netns,
    ga: Netns,
    _inet: Netns,
    b: [Netns; 2],
    host: Netns,
    ka: (String, String),
    kb: [(String, String); 2],
}

impl Far {
    fn new() -> Result<Far> {
        let t = Far {
            a: Netns::new("a")?,
            ga: Netns::new("ga")?,
            _inet: Netns::new("in")?,
            b: [Netns::new("b1")?, Netns::new("b2")?],
            host: Netns::new("h")?,
            ka: wg_keypair()?,
            kb: [wg_keypair()?, wg_keypair()?],
        };
        let inet = &t._inet;
        inet.sh("ip link add br0 type bridge && ip link set br0 up")?;
        t.host.sh("ip link add br0 type bridge && ip link set br0 up")?;
        veth(&t.a, "eth0", &t.ga, "lan0")?;
        veth(&t.ga, "wan0", inet, "pa")?;
        inet.run(&["ip", "link", "set", "pa", "master", "br0"])?;
        t.a.sh("ip addr add 10.1.0.2/24 dev eth0 && ip route add default via 10.1.0.1")?;
        t.ga.sh("ip addr add 10.1.0.1/24 dev lan0 && ip addr add 192.0.2.1/24 dev wan0")?;
        t.ga.sysctl("net.ipv4.ip_forward", "1")?;
        for (i, g) in t.b.iter().enumerate() {
            let n = i + 1;
            veth(g, "wan0", inet, &format!("p{n}"))?;
            veth(g, "lan0", &t.host, &format!("p{n}"))?;
            inet.run(&["ip", "link", "set", &format!("p{n}"), "master", "br0"])?;
            t.host.run(&["ip", "link", "set", &format!("p{n}"), "master", "br0"])?;
            g.sh(&format!(
                "ip addr add 192.0.2.1{n}/24 dev wan0 && ip addr add 10.2.0.1{n}/24 dev lan0"
            ))?;
            g.sysctl("net.ipv4.ip_forward", "1")?;
        }
        t.host
            .sh("ip addr add 10.2.0.2/24 dev br0 && ip route add default via 10.2.0.11")?;
        Ok(t)
    }

    /// Gateway A: the far prefix through both, with these priorities,
    /// probed every 100 ms, down after 2 misses.
    fn config_a(&self, prio: [u8; 2]) -> String {
        let mut s = format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\nUplink = wan0\n\n[Lan]\nInterface = lan0\n",
            self.ka.0
        );
        for (i, k) in self.kb.iter().enumerate() {
            let n = i + 1;
            s += &format!(
                "\n[Peer]\nPublicKey = {}\nEndpoint = 192.0.2.1{n}:51820\nAllowedIPs = 10.2.0.0/24\n\
                 Priority = {}\nProbe = 10.2.0.1{n}\nProbeInterval = 100\nProbeMisses = 2\n",
                k.1, prio[i]
            );
        }
        s
    }

    /// The two far gateways and gateway A (with these priorities) running,
    /// and the tunnel carrying a ping.
    fn up(&self, prio: [u8; 2]) -> Result<[Subway; 3]> {
        let b1 = Subway::start(&self.b[0], &self.config_b(0))?;
        let b2 = Subway::start(&self.b[1], &self.config_b(1))?;
        let ga = Subway::start(&self.ga, &self.config_a(prio))?;
        ping_until(&self.a, "10.2.0.2", 10).with_context(|| ga.diag())?;
        Ok([b1, b2, ga])
    }

    /// A far gateway: site B's LAN, gateway A as its peer.
    fn config_b(&self, i: usize) -> String {
        format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\nUplink = wan0\n\n[Lan]\nInterface = lan0\n\n\
             [Peer]\nPublicKey = {}\nEndpoint = 192.0.2.1:51820\nAllowedIPs = 10.1.0.0/24\n",
            self.kb[i].0, self.ka.1
        )
    }
}

fn peer_json(gw: &Subway, key: &str) -> serde_json::Value {
    gw.show()
        .ok()
        .and_then(|s| s["peers"].as_array()?.iter().find(|p| p["public_key"] == key).cloned())
        .unwrap_or_default()
}

fn route_to_b(gw: &Subway) -> serde_json::Value {
    gw.ctl(&["route", "get", "10.2.0.2", "--name", &gw.name, "--json"])
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default()
}

#[test]
fn the_prefix_moves_to_the_standby_peer_when_the_active_far_gateway_dies() -> Result<()> {
    if !require_root("the_prefix_moves_to_the_standby_peer_when_the_active_far_gateway_dies") {
        return Ok(());
    }
    let t = Far::new()?;
    let [b1, _b2, ga] = t.up([200, 100])?;
    // Both members answer their probes; the prefix goes to the preferred.
    wait_until("both members answer", Duration::from_secs(3), || {
        Ok(peer_json(&ga, &t.kb[0].1)["probe"]["rtt_ms"].is_number()
            && peer_json(&ga, &t.kb[1].1)["probe"]["rtt_ms"].is_number())
    })
    .with_context(|| ga.show().map(|s| s.to_string()).unwrap_or_default())?;
    let r = route_to_b(&ga);
    assert_eq!(r["route"]["via"], t.kb[0].1.as_str(), "{r}");
    // `wg show` lists both peers with the shared prefix, as it would.
    let wg = subway_testkit::host(&["wg", "show", &ga.name, "allowed-ips"])?;
    for k in &t.kb {
        assert!(
            wg.lines().any(|l| l.contains(&k.1) && l.contains("10.2.0.0/24")),
            "{wg}"
        );
    }

    // 1000 datagrams/s to the far host; b1 is SIGKILLed after 1.5 s.
    let flow = UdpFlow::start(&t.a, &t.host, "10.2.0.2:7200".parse()?, 4000, 1000, 100)?;
    std::thread::sleep(Duration::from_millis(1500));
    let mut proc1 = b1.proc;
    t.b[0].run(&["kill", "-KILL", &proc1.pid().to_string()])?;
    let report = flow.finish()?;
    while proc1.alive() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let gap = report.longest_gap();
    eprintln!(
        "active far gateway SIGKILLed (probes every 100 ms, down after 2 misses): longest gap {:.0} ms, {report:?}",
        gap.as_secs_f64() * 1e3
    );
    let p1 = peer_json(&ga, &t.kb[0].1);
    assert_eq!(p1["probe"]["up"], false, "{p1}");
    let r = route_to_b(&ga);
    assert_eq!(r["route"]["via"], t.kb[1].1.as_str(), "{r}");
    // `route get` says who carries it and why.
    let g = &r["route"]["group"];
    assert_eq!(
        (g[0]["up"].clone(), g[0]["active"].clone()),
        (false.into(), false.into()),
        "{r}"
    );
    assert!(g[0]["why"].as_str().unwrap_or("").contains("unanswered"), "{r}");
    assert_eq!(
        (g[1]["up"].clone(), g[1]["active"].clone()),
        (true.into(), true.into()),
        "{r}"
    );
    // Two intervals of detection plus the switch, on a small shared
    // machine: generous, the figure is in the output.
    assert!(gap < Duration::from_millis(700), "longest gap {gap:?}: {report:?}");
    Ok(())
}

#[test]
fn ecmp_over_two_far_gateways_spreads_flows_and_a_dead_ones_flows_move() -> Result<()> {
    if !require_root("ecmp_over_two_far_gateways_spreads_flows_and_a_dead_ones_flows_move") {
        return Ok(());
    }
    let t = Far::new()?;
    let [b1, _b2, ga] = t.up([100, 100])?;
    let r = route_to_b(&ga);
    assert_eq!(r["route"]["kind"], "peers", "{r}");
    // Which far gateway carried each flow: captured where each hands its
    // packets to the far LAN.
    let caps = [
        Capture::start(&t.host, "p1", "udp and dst host 10.2.0.2")?,
        Capture::start(&t.host, "p2", "udp and dst host 10.2.0.2")?,
    ];
    let flows = (0..16u16)
        .map(|i| UdpFlow::start(&t.a, &t.host, format!("10.2.0.2:{}", 7300 + i).parse()?, 3000, 200, 64))
        .collect::<Result<Vec<_>>>()?;
    std::thread::sleep(Duration::from_millis(3000));
    // Where each flow went before the failure.
    let before1 = udp_ports_to(&caps[0].packets()?, "10.2.0.2");
    let before2 = udp_ports_to(&caps[1].packets()?, "10.2.0.2");
    let mut proc1 = b1.proc;
    t.b[0].run(&["kill", "-KILL", &proc1.pid().to_string()])?;
    let reports = flows.into_iter().map(|f| f.finish()).collect::<Result<Vec<_>>>()?;
    let [c1, c2] = caps;
    let (_, all2) = (c1.finish()?, udp_ports_to(&c2.finish()?, "10.2.0.2"));
    while proc1.alive() {
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("ECMP before the failure: b1 {before1:?}, b2 {before2:?}");
    assert!(
        !before1.is_empty() && !before2.is_empty(),
        "16 flows on one gateway: b1 {before1:?} b2 {before2:?}"
    );
    for (i, r) in reports.iter().enumerate() {
        let port = 7300 + i as u16;
        assert!(
            before1.contains_key(&port) != before2.contains_key(&port),
            "flow {port} was on both or neither gateway"
        );
        eprintln!(
            "  flow {port}: on {} before, {r:?}, longest gap {:.0} ms",
            if before1.contains_key(&port) { "b1" } else { "b2" },
            r.longest_gap().as_secs_f64() * 1e3
        );
        if before2.contains_key(&port) {
            // A healthy peer's flows never move and lose nothing.
            assert_eq!(r.lost, 0, "flow {port} on the surviving gateway lost packets: {r:?}");
        } else {
            // A dead peer's flows move to the survivor.
            assert!(all2.contains_key(&port), "flow {port} never reached b2 after b1 died");
            assert!(r.longest_gap() < Duration::from_millis(700), "flow {port}: {r:?}");
        }
    }
    Ok(())
}
