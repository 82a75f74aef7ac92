//! High availability: an active/standby pair of subway gateways for one
//! site, sharing one WireGuard identity, with keepalived (VRRP) moving the
//! LAN's gateway address; the far side is stock wireguard-go, which needs
//! nothing special: it roams to the new active box by the ordinary rules.
//!
//! ```text
//!              ┌ lan0 [g1] wan0 ┐   10.1.0.11 / 192.0.2.11  (priority 150)
//!  a (br0) ────┤   VIP 10.1.0.1 ├── inet (br0) ── b: wireguard-go 192.0.2.2, 10.2.0.2
//!  10.1.0.2    └ lan0 [g2] wan0 ┘   10.1.0.12 / 192.0.2.12  (priority 100)
//! ```
//! keepalived tracks subway through its slow-path TUN (`sw-NAME`): the
//! kernel removes it the moment the process dies, however it dies, and
//! keepalived sees that as an interface going away, at once.

use anyhow::{Context, Result, bail};
use std::time::Duration;
use subway_testkit::{
    FlowReport, Keepalived, Netns, Subway, UdpFlow, WgPeer, host, log_time, ping_until, require_root, veth, wait_until,
    wall_time_of_day, wg_keypair, workspace_bin,
};

struct Pair {
    a: Netns,
    g: [Netns; 2],
    inet: Netns,
    b: Netns,
    site_keys: (String, String),
    b_keys: (String, String),
}

impl Pair {
    fn new() -> Result<Pair> {
        let t = Pair {
            a: Netns::new("a")?,
            g: [Netns::new("g1")?, Netns::new("g2")?],
            inet: Netns::new("in")?,
            b: Netns::new("b")?,
            site_keys: wg_keypair()?,
            b_keys: wg_keypair()?,
        };
        t.a.sh("ip link add br0 type bridge && ip link set br0 up")?;
        t.inet.sh("ip link add br0 type bridge && ip link set br0 up")?;
        for (i, g) in t.g.iter().enumerate() {
            let n = i + 1;
            veth(&t.a, &format!("p{n}"), g, "lan0")?;
            veth(&t.inet, &format!("p{n}"), g, "wan0")?;
            t.a.run(&["ip", "link", "set", &format!("p{n}"), "master", "br0"])?;
            t.inet.run(&["ip", "link", "set", &format!("p{n}"), "master", "br0"])?;
            g.sh(&format!(
                "ip addr add 10.1.0.1{n}/24 dev lan0 && ip -6 addr add fd01::1{n}/64 dev lan0 nodad && \
                 ip addr add 192.0.2.1{n}/24 dev wan0"
            ))?;
            g.sysctl("net.ipv4.ip_forward", "1")?;
            g.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }
        veth(&t.inet, "pb", &t.b, "wan0")?;
        t.inet.run(&["ip", "link", "set", "pb", "master", "br0"])?;
        t.a.sh(
            "ip addr add 10.1.0.2/24 dev br0 && ip route add default via 10.1.0.1 && \
             ip -6 addr add fd01::2/64 dev br0 nodad && ip -6 route add default via fd01::1",
        )?;
        t.b.sh("ip addr add 192.0.2.2/24 dev wan0")?;
        Ok(t)
    }

    /// The same config on both boxes: one identity, one peer, the VIP.
    fn config(&self) -> String {
        format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\nUplink = wan0\n\n[Lan]\nInterface = lan0\n\n\
             [HA]\nVirtualAddress = 10.1.0.1, fd01::1\n\n\
             [Peer]\nPublicKey = {}\nEndpoint = 192.0.2.2:51820\nAllowedIPs = 10.2.0.0/24, fd02::/64\n",
            self.site_keys.0, self.b_keys.1
        )
    }

    /// The far site: stock wireguard-go, which knows the site by its key
    /// and first reaches it at g1's address.
    fn far_side(&self) -> Result<WgPeer> {
        let p = WgPeer::start(
            "wireguard-go",
            &self.b,
            &self.b_keys.0,
            51820,
            &self.site_keys.1,
            "192.0.2.11:51820",
            &["10.1.0.0/24", "fd01::/64"],
        )?;
        self.b.run(&["ip", "addr", "add", "10.2.0.2/32", "dev", &p.ifname])?;
        self.b
            .run(&["ip", "-6", "addr", "add", "fd02::2/128", "dev", &p.ifname, "nodad"])?;
        Ok(p)
    }
}

/// keepalived for one box: VRRPv3 every 30 ms on lan0, both boxes BACKUP
/// with `nopreempt` (a recovered box does not take the address back),
/// tracking subway's TUN and the uplink.
fn keepalived_config(tun: &str, priority: u8) -> String {
    keepalived_config_with(tun, priority, None)
}

/// As [`keepalived_config`], with `subway health` as a track_script.
fn keepalived_config_with(tun: &str, priority: u8, health: Option<&str>) -> String {
    let (script, track) = match health {
        Some(cmd) => (
            format!(
                "vrrp_script subway_health {{\n  script \"{cmd}\"\n  interval 1\n  timeout 2\n  fall 1\n  rise 2\n}}\n"
            ),
            "  track_script {\n    subway_health\n  }\n".to_string(),
        ),
        None => (String::new(), String::new()),
    };
    format!(
        "global_defs {{\n  vrrp_version 3\n  dynamic_interfaces\n  script_user root\n  enable_script_security\n}}\n\
         {script}\
         vrrp_instance site {{\n  state BACKUP\n  nopreempt\n  interface lan0\n  virtual_router_id 51\n  \
         priority {priority}\n  advert_int 0.03\n  virtual_ipaddress {{\n    10.1.0.1/24 dev lan0\n  }}\n  \
         virtual_ipaddress_excluded {{\n    fd01::1/64 dev lan0\n  }}\n  \
         track_interface {{\n    {tun}\n    wan0\n  }}\n{track}}}\n"
    )
}

fn role(gw: &Subway) -> String {
    gw.show()
        .ok()
        .and_then(|s| s["ha"]["role"].as_str().map(String::from))
        .unwrap_or_else(|| "down".into())
}

/// The wall time (seconds into the day) subway logged that it became active.
fn became_active_at(gw_log: &str) -> Option<f64> {
    gw_log
        .lines()
        .rev()
        .filter(|l| l.contains("HA: this box is now ACTIVE"))
        .find_map(log_time)
}

/// A TCP stream from `client` to `server_addr` in `server`: `chunks` KiB
/// written one per `every`, all of it read back by the server. Returns
/// the bytes the server read and the client's address it saw.
fn paced_tcp(
    client: &Netns,
    server: &Netns,
    server_addr: std::net::SocketAddr,
    chunks: usize,
    every: Duration,
) -> Result<(usize, std::net::SocketAddr)> {
    use std::io::{Read, Write};
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let srv = s.spawn(|| {
            server.enter(|| -> Result<(usize, std::net::SocketAddr)> {
                let l = std::net::TcpListener::bind(server_addr)?;
                tx.send(()).ok();
                let (mut c, peer) = l.accept()?;
                c.set_read_timeout(Some(Duration::from_secs(20)))?;
                let mut buf = [0u8; 8192];
                let mut n = 0;
                loop {
                    match c.read(&mut buf)? {
                        0 => break,
                        k => n += k,
                    }
                }
                Ok((n, peer))
            })
        });
        rx.recv_timeout(Duration::from_secs(5))
            .context("the TCP server did not start")?;
        client.enter(|| -> Result<()> {
            let mut c = std::net::TcpStream::connect_timeout(&server_addr, Duration::from_secs(5))?;
            c.set_write_timeout(Some(Duration::from_secs(20)))?;
            let chunk = [0x5au8; 1024];
            for _ in 0..chunks {
                c.write_all(&chunk)?;
                std::thread::sleep(every);
            }
            c.shutdown(std::net::Shutdown::Write)?;
            Ok(())
        })??;
        srv.join().map_err(|_| anyhow::anyhow!("TCP server panicked"))??
    })
}

struct Failover {
    to_b: FlowReport,
    to_a: FlowReport,
    to_b6: FlowReport,
    to_a6: FlowReport,
    /// From the failure to subway on the new box logging ACTIVE (VRRP's part).
    vrrp_ms: f64,
}

impl Failover {
    fn flows(&self) -> [(&'static str, &FlowReport); 4] {
        [
            ("a->b IPv4", &self.to_b),
            ("b->a IPv4", &self.to_a),
            ("a->b IPv6", &self.to_b6),
            ("b->a IPv6", &self.to_a6),
        ]
    }

    fn report(&self, what: &str) {
        eprintln!(
            "{what}: VRRP (failure to the new box's transition) {:.0} ms",
            self.vrrp_ms
        );
        for (dir, r) in self.flows() {
            let gap = r.longest_gap().as_secs_f64() * 1e3;
            eprintln!(
                "  {dir}: longest gap {gap:.0} ms, subway's share {:.0} ms ({r:?})",
                gap - self.vrrp_ms
            );
        }
    }

    /// Every flow resumed: generous bounds for a small shared machine
    /// (the figures are in the report).
    fn check(&self) {
        for (dir, r) in self.flows() {
            assert!(
                r.longest_gap() < Duration::from_secs(1) && r.lost < 1000,
                "{dir}: longest gap {:?} ({r:?})",
                r.longest_gap()
            );
        }
    }
}

/// Runs 1000 datagrams/s each way for 4 s (and a paced TCP stream b -> a),
/// calls `fail` after 1.5 s, and measures what the flows saw.
fn failover_under_traffic(t: &Pair, g2: &Subway, fail: impl FnOnce() -> Result<()>) -> Result<Failover> {
    let to_b = UdpFlow::start(&t.a, &t.b, "10.2.0.2:7100".parse()?, 4000, 1000, 100)?;
    let to_a = UdpFlow::start(&t.b, &t.a, "10.1.0.2:7101".parse()?, 4000, 1000, 100)?;
    let to_b6 = UdpFlow::start(&t.a, &t.b, "[fd02::2]:7104".parse()?, 4000, 1000, 100)?;
    let to_a6 = UdpFlow::start(&t.b, &t.a, "[fd01::2]:7105".parse()?, 4000, 1000, 100)?;
    let (tcp, failed_at) = std::thread::scope(|s| -> Result<_> {
        let tcp = s.spawn(|| {
            paced_tcp(
                &t.b,
                &t.a,
                "10.1.0.2:7102".parse().unwrap(),
                3000,
                Duration::from_millis(1),
            )
        });
        std::thread::sleep(Duration::from_millis(1500));
        let failed_at = wall_time_of_day();
        fail()?;
        let tcp = tcp.join().map_err(|_| anyhow::anyhow!("TCP stream panicked"))?;
        Ok((tcp, failed_at))
    })?;
    let (to_b, to_a) = (to_b.finish()?, to_a.finish()?);
    let (to_b6, to_a6) = (to_b6.finish()?, to_a6.finish()?);
    let (bytes, seen) = tcp.context("the TCP stream across the failover")?;
    assert_eq!(bytes, 3000 * 1024, "the TCP stream lost data or was cut");
    assert_eq!(
        seen.ip().to_string(),
        "10.2.0.2",
        "the LAN host sees the far host's own address"
    );
    let active_at = became_active_at(&g2.proc.log_text())
        .ok_or_else(|| anyhow::anyhow!("g2 never logged that it became active"))?;
    Ok(Failover {
        to_b,
        to_a,
        to_b6,
        to_a6,
        vrrp_ms: (active_at - failed_at) * 1e3,
    })
}

/// Both boxes up with subway and keepalived, g1 active, g2 standby, the
/// tunnel carrying traffic through g1.
fn pair_up(t: &Pair) -> Result<(Subway, Subway, Keepalived, Keepalived, WgPeer)> {
    pair_up_with(t, false)
}

/// As [`pair_up`]; `health`: keepalived also runs `subway health` on g1.
fn pair_up_with(t: &Pair, health: bool) -> Result<(Subway, Subway, Keepalived, Keepalived, WgPeer)> {
    let cfg = t.config();
    let g1 = Subway::start(&t.g[0], &cfg)?;
    let g2 = Subway::start(&t.g[1], &cfg)?;
    assert_eq!(role(&g1), "standby", "no box holds the VIP before keepalived runs");
    let far = t.far_side()?;
    let tun = |gw: &Subway| gw.show().map(|s| s["slow_path"].as_str().unwrap_or("").to_string());
    let bin = workspace_bin("subway")?;
    let cmd = format!("{} health {}", bin.display(), g1.name);
    let k1 = Keepalived::start(
        &t.g[0],
        &keepalived_config_with(&tun(&g1)?, 150, health.then_some(cmd.as_str())),
    )?;
    wait_until(
        "g1 becomes active",
        Duration::from_secs(5),
        || Ok(role(&g1) == "active"),
    )
    .with_context(|| k1.proc.log_text())?;
    let k2 = Keepalived::start(&t.g[1], &keepalived_config(&tun(&g2)?, 100))?;
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(role(&g2), "standby", "{}", k2.proc.log_text());
    ping_until(&t.a, "10.2.0.2", 10).with_context(|| g1.proc.log_text())?;
    Ok((g1, g2, k1, k2, far))
}

#[test]
fn the_standby_takes_over_when_the_active_subway_is_killed_and_the_recovered_box_stays_standby() -> Result<()> {
    if !require_root("the_standby_takes_over_when_the_active_subway_is_killed_and_the_recovered_box_stays_standby") {
        return Ok(());
    }
    let t = Pair::new()?;
    let (g1, g2, _k1, k2, far) = pair_up(&t)?;
    // The standby has sent nothing to the peer: no handshake, no keepalive.
    let s2 = g2.show()?;
    let sent = s2["control"]["tx_datagrams"].as_u64().unwrap_or(0);
    assert_eq!(sent, 0, "the standby sent datagrams: {s2}");
    assert_eq!(s2["peers"][0]["handshakes"], 0, "{s2}");

    let name1 = g1.name.clone();
    let mut proc1 = g1.proc;
    let f = failover_under_traffic(&t, &g2, || {
        // SIGKILL to the child we started, by its pid.
        t.g[0].run(&["kill", "-KILL", &proc1.pid().to_string()])?;
        Ok(())
    })?;
    f.report("active subway SIGKILLed");
    while proc1.alive() {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(role(&g2), "active", "{}", k2.proc.log_text());
    let endpoint = t.b.run(&["wg", "show", &far.ifname, "endpoints"])?;
    assert!(
        endpoint.contains("192.0.2.12:51820"),
        "the far side did not roam to g2: {endpoint}"
    );
    f.check();

    // g1 comes back: its keepalived sees the TUN again, and with nopreempt
    // the box stays standby; traffic through g2 does not notice.
    let flow = UdpFlow::start(&t.a, &t.b, "10.2.0.2:7103".parse()?, 2000, 1000, 100)?;
    std::thread::sleep(Duration::from_millis(300));
    let g1 = Subway::start_as(&t.g[0], &name1, &t.config())?;
    std::thread::sleep(Duration::from_millis(1000));
    let r = flow.finish()?;
    assert_eq!(role(&g1), "standby", "the recovered box took the VIP back");
    assert_eq!(role(&g2), "active");
    assert_eq!(r.lost, 0, "traffic lost while g1 came back: {r:?}");
    Ok(())
}

#[test]
fn the_standby_takes_over_when_the_active_box_drops_off_the_network() -> Result<()> {
    if !require_root("the_standby_takes_over_when_the_active_box_drops_off_the_network") {
        return Ok(());
    }
    let t = Pair::new()?;
    let (_g1, g2, _k1, k2, far) = pair_up(&t)?;
    // The whole box goes: both of its links are pulled at the switches.
    let f = failover_under_traffic(&t, &g2, || {
        t.a.run(&["ip", "link", "set", "p1", "down"])?;
        t.inet.run(&["ip", "link", "set", "p1", "down"])?;
        Ok(())
    })?;
    f.report("active box pulled off the network");
    assert_eq!(role(&g2), "active", "{}", k2.proc.log_text());
    let endpoint = t.b.run(&["wg", "show", &far.ifname, "endpoints"])?;
    if !endpoint.contains("192.0.2.12:51820") {
        bail!("the far side did not roam to g2: {endpoint}");
    }
    f.check();
    Ok(())
}

#[test]
fn a_box_that_cannot_reach_its_peers_gives_up_the_address_through_subway_health() -> Result<()> {
    if !require_root("a_box_that_cannot_reach_its_peers_gives_up_the_address_through_subway_health") {
        return Ok(());
    }
    let t = Pair::new()?;
    let (g1, g2, k1, _k2, _far) = pair_up_with(&t, true)?;
    // The standby is healthy though it has no handshake: it is not its job.
    std::thread::sleep(Duration::from_millis(2500));
    let bin = workspace_bin("subway")?;
    let out = host(&[bin.to_str().unwrap(), "health", &g2.name, "--handshake-within", "2"])?;
    assert!(out.contains("healthy"), "{out}");
    // g1's route to the peer now leaves through the LAN, not the uplink:
    // its links are up (track_interface sees nothing), but it cannot carry
    // the tunnel. `subway health` says so and keepalived moves the address.
    t.g[0].run(&["ip", "route", "add", "192.0.2.2/32", "via", "10.1.0.2", "dev", "lan0"])?;
    wait_until(
        "g2 becomes active",
        Duration::from_secs(5),
        || Ok(role(&g2) == "active"),
    )
    .with_context(|| k1.proc.log_text())?;
    assert_eq!(role(&g1), "standby");
    ping_until(&t.a, "10.2.0.2", 10)?;
    Ok(())
}
