//! VNETs: two remote sites that use the same 10.0.0.0/24, behind one
//! subway gateway, each reached from its own LAN in its own VNET; the two
//! LANs even share 192.168.1.0/24 and the gateway's address on it. Nothing
//! of one VNET may reach the other, nor the kernel's routing.
//!
//! ```text
//!  hr 192.168.1.10 ─ lanr (red)  ┐                      ┌ sr: wireguard-go, 10.0.0.5 (red site)
//!                                hub ─ wan0 ── wan ──┤
//!  hb 192.168.1.10 ─ lanb (blue) ┘  172.16.0.1          └ sb: wireguard-go, 10.0.0.5 (blue site)
//! ```

use anyhow::{Context, Result};
use subway_testkit::{
    Capture, Netns, Subway, WgPeer, icmp_in_echos, icmp6_in_echos, ping, ping_until, require_root, veth, wg_keypair,
};

struct Vnets {
    hub: Netns,
    hr: Netns,
    hb: Netns,
    _wan: Netns,
    sr: Netns,
    sb: Netns,
    hub_keys: (String, String),
    sr_keys: (String, String),
    sb_keys: (String, String),
}

impl Vnets {
    fn new() -> Result<Vnets> {
        let t = Vnets {
            hub: Netns::new("hub")?,
            hr: Netns::new("hr")?,
            hb: Netns::new("hb")?,
            _wan: Netns::new("wan")?,
            sr: Netns::new("sr")?,
            sb: Netns::new("sb")?,
            hub_keys: wg_keypair()?,
            sr_keys: wg_keypair()?,
            sb_keys: wg_keypair()?,
        };
        let wan = &t._wan;
        veth(&t.hr, "eth0", &t.hub, "lanr")?;
        veth(&t.hb, "eth0", &t.hub, "lanb")?;
        veth(&t.hub, "wan0", wan, "toh")?;
        veth(&t.sr, "wan0", wan, "tor")?;
        veth(&t.sb, "wan0", wan, "tob")?;
        for h in [&t.hr, &t.hb] {
            h.sh(
                "ip addr add 192.168.1.10/24 dev eth0 && ip route add default via 192.168.1.1 && \
                 ip -6 addr add fd00:1::10/64 dev eth0 nodad && ip -6 route add default via fd00:1::1",
            )?;
        }
        t.hub.sh(
            "ip addr add 192.168.1.1/24 dev lanr && ip addr add 192.168.1.1/24 dev lanb && \
             ip -6 addr add fd00:1::1/64 dev lanr nodad && ip -6 addr add fd00:1::1/64 dev lanb nodad && \
             ip addr add 172.16.0.1/24 dev wan0 && ip route add default via 172.16.0.254",
        )?;
        t.hub.sysctl("net.ipv4.ip_forward", "1")?;
        wan.sh(
            "ip addr add 172.16.0.254/24 dev toh && ip addr add 172.16.1.254/24 dev tor && \
             ip addr add 172.16.2.254/24 dev tob",
        )?;
        wan.sysctl("net.ipv4.ip_forward", "1")?;
        t.sr.sh("ip addr add 172.16.1.2/24 dev wan0 && ip route add default via 172.16.1.254")?;
        t.sb.sh("ip addr add 172.16.2.2/24 dev wan0 && ip route add default via 172.16.2.254")?;
        Ok(t)
    }

    fn site(&self, ns: &Netns, keys: &(String, String)) -> Result<WgPeer> {
        let p = WgPeer::start(
            "wireguard-go",
            ns,
            &keys.0,
            51820,
            &self.hub_keys.1,
            "172.16.0.1:51820",
            &["192.168.1.0/24", "fd00:1::/64"],
        )?;
        ns.run(&["ip", "addr", "add", "10.0.0.5/32", "dev", &p.ifname])?;
        ns.run(&["ip", "-6", "addr", "add", "fd10::5/128", "dev", &p.ifname, "nodad"])?;
        Ok(p)
    }

    fn config(&self) -> String {
        format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\nUplink = wan0\n\n\
             [Lan]\nInterface = lanr\nVNet = red\n\n[Lan]\nInterface = lanb\nVNet = blue\n\n\
             [Peer]\nPublicKey = {}\nEndpoint = 172.16.1.2:51820\nAllowedIPs = 10.0.0.0/24, fd10::/64\nVNet = red\n\n\
             [Peer]\nPublicKey = {}\nEndpoint = 172.16.2.2:51820\nAllowedIPs = 10.0.0.0/24, 10.7.0.0/24, fd10::/64\nVNet = blue\n",
            self.hub_keys.0, self.sr_keys.1, self.sb_keys.1
        )
    }
}

#[test]
fn the_same_prefix_in_two_vnets_reaches_two_sites_without_cross_talk() -> Result<()> {
    if !require_root("the_same_prefix_in_two_vnets_reaches_two_sites_without_cross_talk") {
        return Ok(());
    }
    let t = Vnets::new()?;
    let _r = t.site(&t.sr, &t.sr_keys)?;
    let _b = t.site(&t.sb, &t.sb_keys)?;
    let hub = Subway::start(&t.hub, &t.config())?;
    let diag = || {
        format!(
            "show: {}\nlog:\n{}",
            hub.show().map(|v| v.to_string()).unwrap_or_default(),
            hub.proc.log_text()
        )
    };

    // The kernel no longer routes the VNETs' LAN prefixes.
    let main = t.hub.run(&["ip", "route", "show", "table", "main"])?;
    assert!(!main.contains("192.168.1.0/24"), "{main}");
    let main6 = t.hub.run(&["ip", "-6", "route", "show", "table", "main"])?;
    assert!(!main6.contains("fd00:1::/64"), "{main6}");

    // A remote site opens first: the gateway must find the LAN host's MAC
    // in the right VNET by itself (no packet from it yet).
    let first = |site: &Netns| {
        site.sh("for i in $(seq 1 10); do ping -c 1 -W 1 -q -I 10.0.0.5 192.168.1.10 && exit 0; done; exit 1")
    };
    let (hr0, hb0) = (icmp_in_echos(&t.hr)?, icmp_in_echos(&t.hb)?);
    first(&t.sr).with_context(diag)?;
    t.sr.run(&[
        "ping",
        "-c",
        "10",
        "-i",
        "0.05",
        "-W",
        "2",
        "-q",
        "-I",
        "10.0.0.5",
        "192.168.1.10",
    ])?;
    let (hr1, hb1) = (icmp_in_echos(&t.hr)?, icmp_in_echos(&t.hb)?);
    assert!(
        hr1 - hr0 >= 11,
        "the red host got {} echos from the red site",
        hr1 - hr0
    );
    assert_eq!(hb1, hb0, "the blue host got echos from the red site");
    first(&t.sb).with_context(diag)?;
    t.sb.run(&[
        "ping",
        "-c",
        "5",
        "-i",
        "0.05",
        "-W",
        "2",
        "-q",
        "-I",
        "10.0.0.5",
        "192.168.1.10",
    ])?;
    let (hr2, hb2) = (icmp_in_echos(&t.hr)?, icmp_in_echos(&t.hb)?);
    assert_eq!(hr2, hr1, "the red host got echos from the blue site");
    assert!(
        hb2 - hb1 >= 6,
        "the blue host got {} echos from the blue site",
        hb2 - hb1
    );
    let s = hub.show()?;
    assert!(
        s["vnet_slow_path"]["sent_after_resolve"].as_u64().unwrap() >= 1,
        "{}",
        s["vnet_slow_path"]
    );

    // Each LAN reaches its own 10.0.0.5: counted at the two sites.
    let (r0, b0) = (icmp_in_echos(&t.sr)?, icmp_in_echos(&t.sb)?);
    ping_until(&t.hr, "10.0.0.5", 10).with_context(diag)?;
    ping(&t.hr, "10.0.0.5", 20)?;
    let (r1, b1) = (icmp_in_echos(&t.sr)?, icmp_in_echos(&t.sb)?);
    assert!(r1 - r0 >= 21, "red site got {} echos from the red LAN", r1 - r0);
    assert_eq!(b1, b0, "the blue site got echos from the red LAN");
    ping_until(&t.hb, "10.0.0.5", 10).with_context(diag)?;
    ping(&t.hb, "10.0.0.5", 20)?;
    let (r2, b2) = (icmp_in_echos(&t.sr)?, icmp_in_echos(&t.sb)?);
    assert_eq!(r2, r1, "the red site got echos from the blue LAN");
    assert!(b2 - b1 >= 21, "blue site got {} echos from the blue LAN", b2 - b1);

    // The same over IPv6: NDP on the right interface, each LAN to its site.
    let (r0, b0) = (icmp6_in_echos(&t.sr)?, icmp6_in_echos(&t.sb)?);
    let (hr0, hb0) = (icmp6_in_echos(&t.hr)?, icmp6_in_echos(&t.hb)?);
    t.sb.sh("for i in $(seq 1 10); do ping -6 -c 1 -W 1 -q -I fd10::5 fd00:1::10 && exit 0; done; exit 1")
        .with_context(diag)?;
    ping_until(&t.hr, "fd10::5", 10).with_context(diag)?;
    ping(&t.hr, "fd10::5", 10)?;
    let (r1, b1) = (icmp6_in_echos(&t.sr)?, icmp6_in_echos(&t.sb)?);
    let (hr1, hb1) = (icmp6_in_echos(&t.hr)?, icmp6_in_echos(&t.hb)?);
    assert!(r1 - r0 >= 11, "red site got {} echos over IPv6", r1 - r0);
    assert_eq!(b1, b0, "the blue site got IPv6 echos from the red LAN");
    assert!(hb1 > hb0, "the blue host got no IPv6 echo from the blue site");
    assert_eq!(hr1, hr0, "the red host got IPv6 echos from the blue site");

    // Red cannot reach blue's other prefix, nor anything through the
    // kernel (the blue site's underlay address is routable from the hub).
    let x0 = hub.xdp("drop_vnet_no_route")?;
    for dst in ["10.7.0.1", "172.16.2.2", "172.16.0.254"] {
        let out = t.hr.output(&["ping", "-c", "3", "-i", "0.05", "-W", "1", "-q", dst])?;
        assert!(!out.status.success(), "the red LAN reached {dst}");
    }
    assert_eq!(icmp_in_echos(&t.sb)?, b2, "a red packet reached the blue site");
    assert!(hub.xdp("drop_vnet_no_route")? >= x0 + 9, "{}", hub.show()?["xdp"]);

    // A router's ICMP errors, from the gateway's address in the VNET:
    // path MTU discovery and traceroute work across the tunnel.
    let text =
        |o: std::process::Output| String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    let big = text(t.hr.output(&["ping", "-M", "do", "-s", "1472", "-c", "1", "-W", "2", "10.0.0.5"])?);
    assert!(
        big.contains("192.168.1.1") && big.contains("mtu = 1420"),
        "no frag-needed: {big}"
    );
    let big6 = text(t.hr.output(&["ping", "-6", "-M", "do", "-s", "1452", "-c", "1", "-W", "2", "fd10::5"])?);
    assert!(
        big6.contains("fd00:1::1") && big6.contains("mtu=1420"),
        "no packet-too-big: {big6}"
    );
    let ttl = text(t.hr.output(&["ping", "-t", "1", "-c", "1", "-W", "2", "10.0.0.5"])?);
    assert!(
        ttl.contains("192.168.1.1") && ttl.contains("Time to live exceeded"),
        "no time-exceeded: {ttl}"
    );
    let s = hub.show()?;
    assert!(
        s["vnet_slow_path"]["icmp_errors"].as_u64().unwrap() >= 3,
        "{}",
        s["vnet_slow_path"]
    );

    // The gateway's own address in a VNET answers ARP and NDP only: the
    // kernel would route its replies with the default VNET's table.
    let l0 = hub.xdp("drop_vnet_local")?;
    let out =
        t.hr.output(&["ping", "-c", "2", "-i", "0.05", "-W", "1", "-q", "192.168.1.1"])?;
    assert!(!out.status.success(), "the gateway answered a ping in VNET red");
    assert!(hub.xdp("drop_vnet_local")? >= l0 + 2, "{}", hub.show()?["xdp"]);
    let fence = t.hub.run(&["nft", "list", "tables"])?;
    assert!(fence.contains("subway_"), "no nft fence: {fence}");
    // Nor from the default VNET (here the underlay, through the uplink):
    // the kernel would accept a packet for any of its addresses anywhere.
    t._wan
        .run(&["ip", "route", "replace", "192.168.1.0/24", "via", "172.16.0.1"])?;
    let out = t
        ._wan
        .output(&["ping", "-c", "2", "-i", "0.05", "-W", "1", "-q", "192.168.1.1"])?;
    assert!(
        !out.status.success(),
        "the default VNET reached the gateway's red address"
    );
    // The uplink address itself still answers.
    ping(&t._wan, "172.16.0.1", 2)?;

    // A link flap makes the kernel put the VNET's connected route back in
    // the main table: the fence still keeps the kernel out of the VNET.
    t.hub.run(&["ip", "link", "set", "lanr", "down"])?;
    t.hub.run(&["ip", "link", "set", "lanr", "up"])?;
    subway_testkit::wait_until(
        "the kernel re-adds the connected route",
        std::time::Duration::from_secs(5),
        || {
            Ok(t.hub
                .run(&["ip", "route", "show", "table", "main"])?
                .contains("192.168.1.0/24 dev lanr"))
        },
    )?;
    let main = t.hub.run(&["ip", "route", "show", "table", "main"])?;
    assert!(
        main.contains("192.168.1.0/24 dev lanr"),
        "expected the kernel to re-add it: {main}"
    );
    let own = t.hub.output(&["ping", "-c", "1", "-W", "1", "-q", "192.168.1.10"])?;
    assert!(!own.status.success(), "the kernel's own traffic reached VNET red");
    for dst in ["172.16.2.2", "10.7.0.1"] {
        let out = t.hr.output(&["ping", "-c", "2", "-i", "0.05", "-W", "1", "-q", dst])?;
        assert!(!out.status.success(), "after a flap the red LAN reached {dst}");
    }
    assert_eq!(icmp_in_echos(&t.sb)?, b2, "a red packet reached the blue site");
    ping_until(&t.hr, "10.0.0.5", 10).with_context(diag)?;

    // `subway show` says which VNET each interface and peer is in.
    let text = hub.ctl(&["show", &hub.name])?;
    assert!(
        text.contains("lanr (") && text.contains("VNET red") && text.contains(&format!("{} (VNET blue)", t.sb_keys.1)),
        "{text}"
    );
    assert!(text.contains("non-default VNETs, control thread:"), "{text}");

    // Route questions answer per VNET.
    let get = |vnet: &str| -> Result<serde_json::Value> {
        let out = hub.ctl(&[
            "route", "get", "10.0.0.5", "--vnet", vnet, "--name", &hub.name, "--json",
        ])?;
        Ok(serde_json::from_str(&out)?)
    };
    assert_eq!(get("red")?["route"]["via"], t.sr_keys.1.as_str());
    assert_eq!(get("blue")?["route"]["via"], t.sb_keys.1.as_str());
    let overlaps: serde_json::Value =
        serde_json::from_str(&hub.ctl(&["route", "overlaps", "--name", &hub.name, "--json"])?)?;
    assert!(
        overlaps
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["a"]["prefix"] == "10.0.0.0/24"
                && p["b"]["prefix"] == "10.0.0.0/24"
                && p["a"]["vnet"] != p["b"]["vnet"]),
        "{overlaps}"
    );

    // Stopping gives the kernel its routes back; the fence stays (FailMode
    // = closed) until `subway down`.
    let name = hub.name.clone();
    let (status, log) = hub.stop();
    assert!(status.is_some_and(|s| s.success()), "{log}");
    let fence = t.hub.run(&["nft", "list", "tables"])?;
    assert!(
        fence.contains("subway_"),
        "the nft fence went with a clean stop: {fence}"
    );
    let down = t.hub.run(&[
        subway_testkit::workspace_bin("subway")?.to_str().unwrap(),
        "down",
        &name,
    ])?;
    assert!(down.contains("removed nft table"), "{down}");
    let fence = t.hub.run(&["nft", "list", "tables"])?;
    assert!(
        !fence.contains("subway_"),
        "the nft fence outlived subway down: {fence}"
    );
    let main = t.hub.run(&["ip", "route", "show", "table", "main"])?;
    assert!(
        main.contains("192.168.1.0/24 dev lanr") && main.contains("192.168.1.0/24 dev lanb"),
        "{main}"
    );
    let main6 = t.hub.run(&["ip", "-6", "route", "show", "table", "main"])?;
    assert!(
        main6.contains("fd00:1::/64 dev lanr") && main6.contains("fd00:1::/64 dev lanb"),
        "{main6}"
    );
    Ok(())
}

/// A failed start leaves no XDP and the routes back, and the VNETs fenced
/// off (fail closed); so does a crash, until the next start, which takes
/// over. A capture on the underlay shows that nothing of red leaves the
/// gateway's uplink, until `subway down`.
#[test]
fn vnets_fail_closed_on_a_crash_and_a_failed_start_leaves_nothing() -> Result<()> {
    if !require_root("vnets_fail_closed_on_a_crash_and_a_failed_start_leaves_nothing") {
        return Ok(());
    }
    let t = Vnets::new()?;
    let _r = t.site(&t.sr, &t.sr_keys)?;
    let _b = t.site(&t.sb, &t.sb_keys)?;
    let routes_before = t.hub.run(&["ip", "route", "show", "table", "main"])?;

    // Fails after the fence is up: veth has one RX queue.
    // One instance name throughout: its fail-safe table is `subway_NAME`.
    let name = subway_testkit::unique("vn");
    let table = format!("subway_{name}");
    let err = Subway::start_as(&t.hub, &name, &(t.config() + "\n[Tuning]\nQueues = 7\n"))
        .err()
        .context("start should fail")?;
    assert!(format!("{err:#}").contains("queue 7"), "{err:#}");
    assert!(
        t.hub.run(&["nft", "list", "tables"])?.contains(&table),
        "a failed start took the fence down"
    );
    assert!(!subway_testkit::xdp_attached(&t.hub, "lanr")?, "XDP left behind");
    let routes_after = t.hub.run(&["ip", "route", "show", "table", "main"])?;
    for r in ["192.168.1.0/24 dev lanr", "192.168.1.0/24 dev lanb"] {
        assert!(
            routes_before.contains(r) && routes_after.contains(r),
            "{r}: {routes_after}"
        );
    }

    // Running, then killed: XDP goes with the process, the fence stays.
    let mut hub = Subway::start_as(&t.hub, &name, &t.config())?;
    ping_until(&t.hr, "10.0.0.5", 10).with_context(|| hub.proc.log_text())?;
    t.hub.run(&["kill", "-9", &hub.proc.pid().to_string()])?;
    let _ = hub.proc.stop(std::time::Duration::from_secs(2));
    subway_testkit::wait_until(
        "XDP detached after the crash",
        std::time::Duration::from_secs(5),
        || Ok(!subway_testkit::xdp_attached(&t.hub, "lanr")?),
    )
    .context("XDP outlived the process")?;
    assert!(
        t.hub.run(&["nft", "list", "tables"])?.contains(&table),
        "the fence went with the crash"
    );
    // The kernel (ip_forward=1, a default route) would route red's packets
    // to the underlay now; the fence does not let them out. Watched where
    // they would arrive: the underlay's side of the gateway's uplink.
    let cap = Capture::start(&t._wan, "toh", "src net 192.168.1.0/24 or src net fd00:1::/64")?;
    let _ =
        t.hr.output(&["ping", "-c", "5", "-i", "0.05", "-W", "1", "-q", "172.16.2.2"])?;
    assert_eq!(
        cap.packets()?,
        Vec::<String>::new(),
        "after a crash red left through the uplink"
    );

    // The next start of the same instance takes over (and its fence).
    let hub = Subway::start_as(&t.hub, &name, &t.config())?;
    ping_until(&t.hr, "10.0.0.5", 10).with_context(|| hub.proc.log_text())?;
    let (status, log) = hub.stop();
    assert!(status.is_some_and(|s| s.success()), "{log}");
    assert!(t.hub.run(&["nft", "list", "tables"])?.contains(&table));
    // `subway down` takes it away, and the capture sees what the kernel now
    // forwards (what makes the check above able to fail).
    t.hub.run(&[
        subway_testkit::workspace_bin("subway")?.to_str().unwrap(),
        "down",
        &name,
    ])?;
    assert!(!t.hub.run(&["nft", "list", "tables"])?.contains(&table));
    let _ =
        t.hr.output(&["ping", "-c", "5", "-i", "0.05", "-W", "1", "-q", "172.16.2.2"])?;
    let seen = cap.finish()?;
    assert!(
        seen.len() >= 5,
        "without the fence red should leave through the uplink: {seen:?}"
    );
    Ok(())
}

#[test]
fn a_deny_rule_in_one_vnet_leaves_the_other_vnet_with_the_same_prefixes_alone() -> Result<()> {
    if !require_root("a_deny_rule_in_one_vnet_leaves_the_other_vnet_with_the_same_prefixes_alone") {
        return Ok(());
    }
    let t = Vnets::new()?;
    let _r = t.site(&t.sr, &t.sr_keys)?;
    let _b = t.site(&t.sb, &t.sb_keys)?;
    // Same prefixes on both sides of both VNETs; red denies ICMP to the
    // remote site, blue has no policy.
    let cfg = t.config() + "\n[Policy]\nVNet = red\nRule = deny proto icmp to 10.0.0.0/24\n";
    let hub = Subway::start(&t.hub, &cfg)?;
    ping_until(&t.hb, "10.0.0.5", 10).with_context(|| hub.diag())?;
    let drops = hub.total("drop_policy")?;
    assert!(ping(&t.hr, "10.0.0.5", 3).is_err(), "red's deny rule let ICMP through");
    assert!(hub.total("drop_policy")? >= drops + 3);
    ping(&t.hb, "10.0.0.5", 5).with_context(|| hub.diag())?;
    // Red still carries what its rule does not name (IPv6 here).
    ping_until(&t.hr, "fd10::5", 10).with_context(|| hub.diag())?;
    let v = hub.show()?;
    assert_eq!(v["policies"].as_array().map(|a| a.len()), Some(1), "{}", v["policies"]);
    assert_eq!(v["policies"][0]["vnet"], "red");
    assert!(v["policies"][0]["rules"][0]["packets"].as_u64().unwrap_or(0) >= 3);
    Ok(())
}
