//! Two sites joined through subway gateways over WireGuard, end to end in
//! network namespaces: hosts on either side reach each other with their
//! own addresses, both ways, over IPv4 and IPv6 inside and outside.
//! One file for the two-site suite (interop with each standard peer,
//! one-armed, IPv6 outside, route questions), hence its length.

use anyhow::{Context, Result};
use std::time::Duration;
use subway_testkit::{Netns, Subway, TwoSites, UdpFlow, ping, ping_until, require_root, tcp_echo, wait_until};

#[test]
fn two_sites_reach_each_other_through_subway_both_ways() -> Result<()> {
    if !require_root("two_sites_reach_each_other_through_subway_both_ways") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    let ga = Subway::start(&t.gwa, &t.subway_config(true, false, ""))?;
    let gb = Subway::start(&t.gwb, &t.subway_config(false, false, ""))?;

    let diag = || {
        format!(
            "A: {}\nB: {}\nA log:\n{}\nB log:\n{}",
            ga.show().map(|v| v.to_string()).unwrap_or_default(),
            gb.show().map(|v| v.to_string()).unwrap_or_default(),
            ga.proc.log_text(),
            gb.proc.log_text()
        )
    };
    ping_until(&t.a, "10.2.0.2", 10).with_context(diag)?;
    ping(&t.a, "10.2.0.2", 10)?;
    ping(&t.b, "10.1.0.2", 10)?;
    ping_until(&t.a, "fd02::2", 5)?;
    ping(&t.b, "fd01::2", 5)?;

    // The server sees the client's own address, and either side may open.
    let seen = tcp_echo(&t.a, &t.b, "10.2.0.2:6001".parse()?, 256 * 1024)?;
    assert_eq!(seen.ip().to_string(), "10.1.0.2");
    let seen = tcp_echo(&t.b, &t.a, "10.1.0.2:6002".parse()?, 256 * 1024)?;
    assert_eq!(seen.ip().to_string(), "10.2.0.2");
    let seen = tcp_echo(&t.a, &t.b, "[fd02::2]:6003".parse()?, 64 * 1024)?;
    assert_eq!(seen.ip().to_string(), "fd01::2");

    // Route questions to the running instance.
    let bin = subway_testkit::workspace_bin("subway")?;
    let q = |args: &[&str]| -> Result<serde_json::Value> {
        let mut a = vec![bin.to_str().unwrap(), "route"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["--name", &ga.name, "--json"]);
        Ok(serde_json::from_str(&subway_testkit::host(&a)?)?)
    };
    let got = q(&["get", "10.2.0.77"])?;
    assert_eq!(got["route"]["kind"], "peer", "{got}");
    assert_eq!(got["route"]["via"], t.keys_b.1.as_str(), "{got}");
    assert_eq!(got["route"]["endpoint"], "192.0.2.2:51820", "{got}");
    let got = q(&["get", "10.1.0.9"])?;
    assert_eq!(got["route"]["via"], "lan0", "{got}");
    assert!(q(&["list"])?.as_array().unwrap().len() >= 4);
    // `route explain` on the running instance: A's host to B's, with a
    // session up (the ping above) and the real neighbour of the reply.
    let ex = q(&[
        "explain", "--src", "10.1.0.2", "--dst", "10.2.0.2", "--proto", "tcp", "--port", "443",
    ])?;
    let steps = ex["steps"].to_string();
    assert!(
        ex["verdict"]
            .as_str()
            .is_some_and(|v| v.starts_with("tunneled to peer") && v.contains(&t.keys_b.1)),
        "{ex}"
    );
    assert!(
        steps.contains("XDP on lan0: redirected") && steps.contains("sealed for session"),
        "{ex}"
    );
    assert_eq!(ex["counter"], "tunnel_tx", "{ex}");
    // From B's side: steered as the datagram that carries it, opened,
    // checked against B's AllowedIPs, out of lan0 to the real neighbour.
    let back = q(&["explain", "--src", "10.2.0.2", "--dst", "10.1.0.2"])?;
    assert_eq!(back["verdict"], "forwarded out of lan0 by the fast path", "{back}");
    assert!(back["steps"].to_string().contains("XDP on wan0: redirected"), "{back}");
    let forged = q(&[
        "explain",
        "--src",
        "10.9.9.9",
        "--dst",
        "10.1.0.2",
        "--from",
        &t.keys_b.1,
    ])?;
    assert_eq!(forged["counter"], "drop_not_allowed", "{forged}");
    let outside = q(&["explain", "--src", "10.1.0.2", "--dst", "198.51.100.7"])?;
    assert_eq!(outside["verdict"], "handled by the kernel, not subway", "{outside}");
    assert_eq!(outside["counter"], "pass_no_route", "{outside}");
    let ttl1 = q(&["explain", "--src", "10.1.0.2", "--dst", "10.2.0.2", "--ttl", "1"])?;
    assert_eq!(ttl1["counter"], "pass_ttl_expired", "{ttl1}");
    // Too big for the tunnel: explain names the counter, and the fast path
    // counts a real packet of that size under it (the kernel answers
    // "fragmentation needed", so ping -M do fails: that is the point).
    let big = q(&[
        "explain", "--src", "10.1.0.2", "--dst", "10.2.0.2", "--proto", "icmp", "--size", "1500",
    ])?;
    assert_eq!(big["counter"], "slow_too_big", "{big}");
    let too_big = |gw: &Subway| -> Result<u64> { Ok(gw.show()?["totals"]["slow_too_big"].as_u64().unwrap_or(0)) };
    let before = too_big(&ga)?;
    let _ =
        t.a.output(&["ping", "-c", "1", "-W", "1", "-M", "do", "-s", "1472", "10.2.0.2"]);
    wait_until(
        "the fast path counts the too-big packet",
        Duration::from_secs(3),
        || Ok(too_big(&ga)? > before),
    )?;
    assert_eq!(
        q(&["overlaps"])?.as_array().unwrap().len(),
        0,
        "the sites' prefixes do not overlap"
    );

    // The tools WireGuard users know: `wg show` reads subway's UAPI socket.
    let wg = subway_testkit::host(&["wg", "show", &ga.name])?;
    assert!(wg.contains(&format!("peer: {}", t.keys_b.1)), "{wg}");
    assert!(
        wg.contains("endpoint: 192.0.2.2:51820") && wg.contains("latest handshake") && wg.contains("transfer"),
        "{wg}"
    );
    assert!(wg.contains("listening port: 51820"), "{wg}");

    // The data went through the workers' tunnel path.
    for gw in [&ga, &gb] {
        let s = gw.show()?;
        let tx = s["totals"]["tunnel_tx"].as_u64().unwrap();
        let rx = s["totals"]["tunnel_rx"].as_u64().unwrap();
        assert!(tx > 100 && rx > 100, "tunnel_tx {tx}, tunnel_rx {rx}: {}", s["totals"]);
        assert_eq!(s["peers"][0]["fast_path"], true, "{}", s["peers"]);
        assert!(s["peers"][0]["latest_handshake_secs_ago"].as_u64().is_some());
    }
    Ok(())
}

#[test]
fn the_tunnel_runs_over_ipv6_outside() -> Result<()> {
    if !require_root("the_tunnel_runs_over_ipv6_outside") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    let _ga = Subway::start(&t.gwa, &t.subway_config(true, true, ""))?;
    // B is not told where A is: it learns A's IPv6 endpoint from A's
    // handshake (roaming on handshakes, over IPv6).
    let b_cfg = t.subway_config(false, true, "");
    let b_cfg = b_cfg.replace("Endpoint = [2001:db8::1]:51820\n", "");
    assert!(!b_cfg.contains("Endpoint"), "{b_cfg}");
    let gb = Subway::start(&t.gwb, &b_cfg)?;
    ping_until(&t.a, "10.2.0.2", 10)?;
    ping(&t.a, "10.2.0.2", 5)?;
    ping_until(&t.b, "fd01::2", 5)?;
    let s = gb.show()?;
    assert!(
        s["peers"][0]["endpoint"].as_str().unwrap().starts_with("[2001:db8::1]"),
        "{}",
        s["peers"]
    );
    assert!(s["totals"]["tunnel_rx"].as_u64().unwrap() >= 5);
    Ok(())
}

/// subway at site A, a standard WireGuard implementation at site B.
fn interop(impl_: &str, b_initiates: bool) -> Result<()> {
    let t = TwoSites::new()?;
    // subway handshakes at start with every peer it has an endpoint for:
    // for B to be the initiator, A knows no endpoint (B roams in).
    let mut cfg = t.subway_config(true, false, "");
    if b_initiates {
        cfg = cfg.replace("Endpoint = 192.0.2.2:51820\n", "");
    }
    let ga = Subway::start(&t.gwa, &cfg)?;
    let wg = t.standard_b(impl_)?;
    let diag = || {
        format!(
            "subway: {}\n{impl_} log:\n{}",
            ga.show().map(|v| v.to_string()).unwrap_or_default(),
            wg.proc.log_text()
        )
    };
    let (first, second) = if b_initiates { (&t.b, &t.a) } else { (&t.a, &t.b) };
    let (first_dst, second_dst) = if b_initiates {
        ("10.1.0.2", "10.2.0.2")
    } else {
        ("10.2.0.2", "10.1.0.2")
    };
    ping_until(first, first_dst, 10).with_context(diag)?;
    ping(second, second_dst, 5).with_context(diag)?;
    ping(&t.a, "fd02::2", 3).with_context(diag)?;
    let seen = tcp_echo(&t.a, &t.b, "10.2.0.2:6101".parse()?, 256 * 1024).with_context(diag)?;
    assert_eq!(seen.ip().to_string(), "10.1.0.2");
    let seen = tcp_echo(&t.b, &t.a, "10.1.0.2:6102".parse()?, 256 * 1024).with_context(diag)?;
    assert_eq!(seen.ip().to_string(), "10.2.0.2");
    let s = ga.show()?;
    assert!(s["totals"]["tunnel_rx"].as_u64().unwrap() > 50, "{}", s["totals"]);
    assert!(s["totals"]["tunnel_tx"].as_u64().unwrap() > 50, "{}", s["totals"]);
    // Who initiated the session in use: subway when A spoke first.
    assert_eq!(s["peers"][0]["session_initiator"], !b_initiates, "{}", s["peers"]);
    Ok(())
}

#[test]
fn interop_wireguard_go_subway_initiates() -> Result<()> {
    if !require_root("interop_wireguard_go_subway_initiates") {
        return Ok(());
    }
    interop("wireguard-go", false)
}

#[test]
fn interop_wireguard_go_initiates() -> Result<()> {
    if !require_root("interop_wireguard_go_initiates") {
        return Ok(());
    }
    interop("wireguard-go", true)
}

#[test]
fn interop_boringtun_cli_subway_initiates() -> Result<()> {
    if !require_root("interop_boringtun_cli_subway_initiates") {
        return Ok(());
    }
    interop("boringtun-cli", false)
}

#[test]
fn interop_boringtun_cli_initiates() -> Result<()> {
    if !require_root("interop_boringtun_cli_initiates") {
        return Ok(());
    }
    interop("boringtun-cli", true)
}

#[test]
fn rekey_under_traffic_loses_nothing() -> Result<()> {
    if !require_root("rekey_under_traffic_loses_nothing") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    // Test hook: REKEY_AFTER_TIME shortened to 5 s (REKEY_TIMEOUT, the floor).
    let env = [("SUBWAY_TEST_REKEY_AFTER_SECS", "5")];
    let ga = Subway::start_env(&t.gwa, &t.subway_config(true, false, ""), &env)?;
    let gb = Subway::start_env(&t.gwb, &t.subway_config(false, false, ""), &env)?;
    ping_until(&t.a, "10.2.0.2", 10)?;
    let before = ga.show()?["peers"][0]["handshakes"].as_u64().unwrap();
    // 2500 datagrams over 12.5 s cross at least two rekeys. What a rekey
    // could lose is lost at a gateway, counted by name: none of that may
    // happen. The hosts' own sockets on a loaded 2-core runner may drop a
    // datagram now and then (not a rekey's doing): 0.5% is tolerated there.
    // Both ways: whichever side initiated the session rekeys on its sends.
    let ab = UdpFlow::start(&t.a, &t.b, "10.2.0.2:6301".parse()?, 2500, 200, 100)?;
    let ba = UdpFlow::start(&t.b, &t.a, "10.1.0.2:6302".parse()?, 2500, 200, 100)?;
    let (ab, ba) = (ab.finish()?, ba.finish()?);
    let after = ga.show()?["peers"][0]["handshakes"].as_u64().unwrap();
    assert!(after >= before + 2, "expected two rekeys, saw {before} -> {after}");
    for (name, gw) in [("A", &ga), ("B", &gb)] {
        let s = gw.show()?;
        for c in [
            "drop_wg_unknown_index",
            "drop_wg_expired",
            "drop_wg_decrypt_failed",
            "drop_no_tunnel",
            "drop_slow_path_limited",
        ] {
            assert_eq!(s["totals"][c], 0, "{name}: {c}: {}", s["totals"]);
        }
    }
    for r in [&ab, &ba] {
        assert!(r.lost * 200 <= r.sent, "loss across rekeys: {r:?}");
    }
    Ok(())
}

#[test]
fn garbage_to_the_listen_port_is_counted_and_the_tunnel_keeps_working() -> Result<()> {
    if !require_root("garbage_to_the_listen_port_is_counted_and_the_tunnel_keeps_working") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    let ga = Subway::start(&t.gwa, &t.subway_config(true, false, ""))?;
    let _gb = Subway::start(&t.gwb, &t.subway_config(false, false, ""))?;
    ping_until(&t.a, "10.2.0.2", 10)?;
    // From the internet side: random bytes, truncated and forged messages
    // of every type, and replays of nothing in particular.
    t.gwb.enter(|| -> Result<()> {
        let s = std::net::UdpSocket::bind("192.0.2.2:40000")?;
        let mut seed = 0x1234_5678u64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for i in 0..400u32 {
            let len = match i % 5 {
                0 => 148,
                1 => 92,
                2 => 64,
                3 => 32 + (rnd() % 200) as usize,
                _ => (rnd() % 60) as usize,
            };
            let mut m: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
            if !m.is_empty() && i % 5 < 4 {
                m[0] = [1u8, 2, 3, 4][(i % 5) as usize % 4];
                for b in m.iter_mut().take(4).skip(1) {
                    *b = 0;
                }
            }
            s.send_to(&m, "192.0.2.1:51820")?;
            if i % 50 == 49 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(())
    })??;
    // Until the control thread has refused the handshake-type garbage.
    let refused = || -> Result<u64> {
        let s = ga.show()?;
        Ok(s["control"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with("wg_"))
            .map(|(_, v)| v.as_u64().unwrap())
            .sum())
    };
    subway_testkit::wait_until("garbage refused", Duration::from_secs(5), || Ok(refused()? >= 200))?;
    let s = ga.show()?;
    let control: u64 = s["control"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("wg_"))
        .map(|(_, v)| v.as_u64().unwrap())
        .sum();
    let workers =
        s["totals"]["drop_wg_unknown_index"].as_u64().unwrap() + s["totals"]["drop_wg_not_data"].as_u64().unwrap();
    assert!(
        control >= 200,
        "handshake-type garbage refused by the control thread: {}",
        s["control"]
    );
    assert!(
        workers >= 70,
        "data-type garbage dropped by the workers: {}",
        s["totals"]
    );
    // Still up.
    ping(&t.a, "10.2.0.2", 5)?;
    ping(&t.b, "10.1.0.2", 5)?;
    Ok(())
}

#[test]
fn too_big_for_the_tunnel_gets_icmp_and_tcp_fits_by_mss_clamping() -> Result<()> {
    if !require_root("too_big_for_the_tunnel_gets_icmp_and_tcp_fits_by_mss_clamping") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    let ga = Subway::start(&t.gwa, &t.subway_config(true, false, ""))?;
    let _gb = Subway::start(&t.gwb, &t.subway_config(false, false, ""))?;
    ping_until(&t.a, "10.2.0.2", 10)?;
    // A TCP transfer of 4 MB between hosts with 1500-byte MTUs completes:
    // their SYNs were clamped to fit the tunnel (before any ICMP taught
    // the hosts the path MTU).
    let seen = tcp_echo(&t.a, &t.b, "10.2.0.2:6201".parse()?, 4 << 20)?;
    assert_eq!(seen.ip().to_string(), "10.1.0.2");
    let s = ga.show()?;
    assert!(s["totals"]["mss_clamped"].as_u64().unwrap() >= 1, "{}", s["totals"]);
    // The transfer never needed the kernel's "fragmentation needed": the
    // SYN's MSS was enough (PMTUD would otherwise have rescued it).
    assert_eq!(s["totals"]["slow_too_big"].as_u64(), Some(0), "{}", s["totals"]);
    // The server saw the clamped MSS both ways round and in both families:
    // the tunnel MTU (1420) less the IP and TCP headers, 1380 (v4) and 1360
    // (v6); TCP_MAXSEG reports it less the TCP options in use (timestamps,
    // 12 bytes). Unclamped it would be 1460 / 1440 less the same.
    let clamped = |mss: u32, max: u32| mss <= max && mss + 40 >= max;
    for (c, s, addr, max) in [
        (&t.a, &t.b, "10.2.0.2:6202", 1380),
        (&t.b, &t.a, "10.1.0.2:6203", 1380),
        (&t.a, &t.b, "[fd02::2]:6204", 1360),
    ] {
        let mss = subway_testkit::tcp_mss_seen(c, s, addr.parse()?)?;
        assert!(
            clamped(mss, max),
            "{addr}: the server saw MSS {mss}, the clamp is {max}"
        );
    }
    // 1500-byte IPv4 packets with DF into a 1420-byte tunnel.
    let out = t.a.output(&[
        "ping", "-c", "3", "-i", "0.2", "-W", "1", "-M", "do", "-s", "1472", "10.2.0.2",
    ])?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("mtu = 1420") || text.contains("mtu=1420"),
        "no ICMP fragmentation needed:\n{text}"
    );
    // And 1500-byte IPv6 packets get "packet too big".
    let out = t.a.output(&[
        "ping", "-6", "-c", "3", "-i", "0.2", "-W", "1", "-M", "do", "-s", "1452", "fd02::2",
    ])?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("mtu = 1420") || text.contains("mtu=1420"),
        "no ICMPv6 packet too big:\n{text}"
    );
    let s = ga.show()?;
    assert!(s["totals"]["slow_too_big"].as_u64().unwrap() >= 2, "{}", s["totals"]);
    Ok(())
}

/// Three sites on one "internet" segment (a bridge), each gateway peering
/// with both others.
#[test]
fn mesh_of_three_sites() -> Result<()> {
    if !require_root("mesh_of_three_sites") {
        return Ok(());
    }
    use subway_testkit::wg_keypair;
    let sites = subway_testkit::SitesOnABridge::new(3)?;
    let (hosts, gws) = (&sites.hosts, &sites.gws);
    let keys = (0..3).map(|_| wg_keypair()).collect::<Result<Vec<_>>>()?;
    let mut subways = Vec::new();
    for i in 0..3usize {
        let mut cfg = format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\nUplink = wan0\n\n[Lan]\nInterface = lan0\n",
            keys[i].0
        );
        for j in (0..3usize).filter(|j| *j != i) {
            cfg += &format!(
                "\n[Peer]\nPublicKey = {}\nEndpoint = 192.0.2.{}:51820\nAllowedIPs = 10.{}.0.0/24\n",
                keys[j].1,
                j + 1,
                j + 1
            );
        }
        subways.push(Subway::start(&gws[i], &cfg)?);
    }
    for (i, host) in hosts.iter().enumerate() {
        for j in (0..3usize).filter(|j| *j != i) {
            let dst = format!("10.{}.0.2", j + 1);
            ping_until(host, &dst, 10).with_context(|| format!("site {} -> site {}", i + 1, j + 1))?;
            ping(host, &dst, 3)?;
        }
    }
    for s in &subways {
        let v = s.show()?;
        let peers = v["peers"].as_array().unwrap();
        assert_eq!(peers.len(), 2);
        assert!(peers.iter().all(|p| p["fast_path"] == true), "{}", v["peers"]);
    }
    Ok(())
}

/// One-armed: the gateway has one interface, which is both its LAN and
/// its uplink; hosts reach the far site through a static route to it.
#[test]
fn one_armed_static_route_next_hop() -> Result<()> {
    if !require_root("one_armed_static_route_next_hop") {
        return Ok(());
    }
    use subway_testkit::{veth, wg_keypair};
    // One LAN segment: host a, gateway A (one arm), and gateway B's
    // outside, as the site's router to "the internet" would be.
    let seg = Netns::new("sg")?;
    seg.sh("ip link add br0 type bridge && ip link set br0 up")?;
    let a = Netns::new("a")?;
    let gwa = Netns::new("ga")?;
    let gwb = Netns::new("gb")?;
    let b = Netns::new("b")?;
    veth(&a, "eth0", &seg, "pa")?;
    veth(&gwa, "eth0", &seg, "pg")?;
    veth(&gwb, "wan0", &seg, "pw")?;
    veth(&b, "eth0", &gwb, "lan0")?;
    for p in ["pa", "pg", "pw"] {
        seg.run(&["ip", "link", "set", p, "master", "br0"])?;
    }
    a.sh("ip addr add 10.1.0.2/24 dev eth0 && ip route add 10.2.0.0/24 via 10.1.0.1")?;
    gwa.sh("ip addr add 10.1.0.1/24 dev eth0")?;
    gwb.sh("ip addr add 10.1.0.3/24 dev wan0 && ip addr add 10.2.0.1/24 dev lan0")?;
    b.sh("ip addr add 10.2.0.2/24 dev eth0 && ip route add default via 10.2.0.1")?;
    gwa.sysctl("net.ipv4.ip_forward", "1")?;
    gwb.sysctl("net.ipv4.ip_forward", "1")?;
    let (ka, kb) = (wg_keypair()?, wg_keypair()?);
    let cfg_a = format!(
        "[Interface]\nPrivateKey = {}\nListenPort = 51820\nUplink = eth0\n\n[Lan]\nInterface = eth0\nSubnets = 10.1.0.0/24\n\n\
         [Peer]\nPublicKey = {}\nEndpoint = 10.1.0.3:51820\nAllowedIPs = 10.2.0.0/24\n",
        ka.0, kb.1
    );
    let cfg_b = format!(
        "[Interface]\nPrivateKey = {}\nListenPort = 51820\nUplink = wan0\n\n[Lan]\nInterface = lan0\n\n\
         [Peer]\nPublicKey = {}\nEndpoint = 10.1.0.1:51820\nAllowedIPs = 10.1.0.2/32\n",
        kb.0, ka.1
    );
    let ga = Subway::start(&gwa, &cfg_a)?;
    let _gb = Subway::start(&gwb, &cfg_b)?;
    ping_until(&a, "10.2.0.2", 10)?;
    ping(&a, "10.2.0.2", 5)?;
    ping(&b, "10.1.0.2", 5)?;
    let seen = tcp_echo(&b, &a, "10.1.0.2:6301".parse()?, 128 * 1024)?;
    assert_eq!(seen.ip().to_string(), "10.2.0.2");
    let s = ga.show()?;
    assert!(
        s["totals"]["tunnel_tx"].as_u64().unwrap() >= 5 && s["totals"]["tunnel_rx"].as_u64().unwrap() >= 5,
        "{}",
        s["totals"]
    );
    Ok(())
}

/// The README's quick start, run exactly as written (with this build's
/// binary): two sites, ping both ways, `subway show`.
#[test]
fn readme_quick_start_works() -> Result<()> {
    if !require_root("readme_quick_start_works") {
        return Ok(());
    }
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))?;
    let start = readme.find("<!-- quickstart:begin -->").context("quick start marker")?;
    let end = readme
        .find("<!-- quickstart:end -->")
        .context("quick start end marker")?;
    let block = &readme[start..end];
    let script = block
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(s, _)| s)
        .context("no sh block in the quick start")?;
    let bin = subway_testkit::workspace_bin("subway")?;
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(script)
        .env("SUBWAY", &bin)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the quick start failed:\n{text}");
    assert!(
        text.contains("5 packets transmitted, 5 received") || text.contains("5 received"),
        "{text}"
    );
    assert!(text.contains("3 received"), "{text}");
    assert!(
        text.contains("instance site-a"),
        "subway show printed nothing useful:\n{text}"
    );
    Ok(())
}

/// Prometheus text on the configured address agrees with `subway show`.
#[test]
fn metrics_match_show() -> Result<()> {
    if !require_root("metrics_match_show") {
        return Ok(());
    }
    use std::io::{Read, Write};
    let t = TwoSites::new()?;
    let cfg = t.subway_config(true, false, "") + "\n[Metrics]\nListen = 127.0.0.1:9586\n";
    let ga = Subway::start(&t.gwa, &cfg)?;
    let _gb = Subway::start(&t.gwb, &t.subway_config(false, false, ""))?;
    ping_until(&t.a, "10.2.0.2", 10)?;
    ping(&t.a, "10.2.0.2", 5)?;
    let scrape = t.gwa.enter(|| -> Result<String> {
        let mut s = std::net::TcpStream::connect("127.0.0.1:9586")?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })??;
    let show = ga.show()?;
    assert!(scrape.starts_with("HTTP/1.1 200 OK"), "{scrape}");
    let value = |prefix: &str| -> Option<u64> {
        scrape
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    let key = t.keys_b.1.clone();
    // Both present (None == None would pass) and equal; the traffic has
    // stopped, so the scrape and the show that follows agree.
    let handshakes = value(&format!("subway_peer_handshakes_total{{peer=\"{key}\"}}"));
    assert!(handshakes.is_some_and(|h| h >= 1), "{scrape}");
    assert_eq!(handshakes, show["peers"][0]["handshakes"].as_u64(), "{scrape}");
    let redirected = value("subway_xdp_packets_total{reason=\"redirect_route\"}");
    assert!(redirected.is_some_and(|r| r >= 5), "{scrape}");
    assert_eq!(redirected, show["xdp"]["redirect_route"].as_u64(), "{scrape}");
    assert!(
        value("subway_worker_packets_total{worker=\"0\",counter=\"tunnel_tx\"}").unwrap_or(0) >= 5,
        "{scrape}"
    );
    Ok(())
}

/// The far gateway's address changes (a NAT rebinding, a new uplink
/// address): its data alone is enough for subway to follow it.
#[test]
fn a_peer_that_roams_is_followed_on_data() -> Result<()> {
    if !require_root("a_peer_that_roams_is_followed_on_data") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    let ga = Subway::start(&t.gwa, &t.subway_config(true, false, ""))?;
    let _gb = Subway::start(&t.gwb, &t.subway_config(false, false, ""))?;
    ping_until(&t.a, "10.2.0.2", 10)?;
    // Site B's gateway moves to 192.0.2.22; its sessions stay.
    t.gwb
        .sh("ip addr del 192.0.2.2/24 dev wan0 && ip addr add 192.0.2.22/24 dev wan0")?;
    std::thread::sleep(Duration::from_millis(300));
    // B speaks first from its new address; A follows it there.
    ping_until(&t.b, "10.1.0.2", 10)?;
    ping(&t.a, "10.2.0.2", 5)?;
    let s = ga.show()?;
    assert_eq!(s["peers"][0]["endpoint"], "192.0.2.22:51820", "{}", s["peers"]);
    assert!(s["control"]["roams"].as_u64().unwrap_or(0) >= 1, "{}", s["control"]);
    Ok(())
}

/// Cryptokey routing on the fast path: a stock wireguard-go far side
/// encrypts whatever its kernel routes into the tunnel, including a packet
/// whose source is outside the AllowedIPs subway has for it. subway drops
/// it after decryption (`drop_not_allowed`) and the LAN host never sees it;
/// the peer's genuine traffic still flows.
#[test]
fn cryptokey_routing_drops_a_source_outside_the_peers_allowed_ips() -> Result<()> {
    if !require_root("cryptokey_routing_drops_a_source_outside_the_peers_allowed_ips") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    let _wg = t.standard_b("wireguard-go")?;
    let ga = Subway::start(&t.gwa, &t.subway_config(true, false, ""))?;
    ping_until(&t.b, "10.1.0.2", 10).with_context(|| ga.proc.log_text())?;
    // B's gateway owns an address outside 10.2.0.0/24 and pings from it:
    // its route to 10.1.0.0/24 is the tunnel, so wireguard-go seals it.
    t.gwb.run(&["ip", "addr", "add", "10.77.0.1/32", "dev", "lo"])?;
    let (echos, dropped) = (subway_testkit::icmp_in_echos(&t.a)?, ga.total("drop_not_allowed")?);
    let out = t.gwb.output(&[
        "ping",
        "-I",
        "10.77.0.1",
        "-c",
        "5",
        "-i",
        "0.1",
        "-W",
        "1",
        "-q",
        "10.1.0.2",
    ])?;
    assert!(!out.status.success(), "a spoofed source got an answer");
    subway_testkit::wait_until("the spoofed packets counted", Duration::from_secs(5), || {
        Ok(ga.total("drop_not_allowed")? >= dropped + 5)
    })?;
    assert_eq!(
        subway_testkit::icmp_in_echos(&t.a)?,
        echos,
        "the LAN host saw a spoofed packet"
    );
    ping(&t.b, "10.1.0.2", 5)?;
    Ok(())
}

/// The control thread sleeps until something arrives or a timer is due
/// (it used to wake 20 times a second), and a neighbour the kernel learns
/// reaches the workers' table from netlink's event, with no traffic and
/// no periodic dump to bring it.
#[test]
fn an_idle_control_loop_sleeps_and_follows_neighbour_changes_as_they_come() -> Result<()> {
    if !require_root("an_idle_control_loop_sleeps_and_follows_neighbour_changes_as_they_come") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    let ga = Subway::start(&t.gwa, &t.subway_config(true, false, ""))?;
    let gb = Subway::start(&t.gwb, &t.subway_config(false, false, ""))?;
    ping_until(&t.a, "10.2.0.2", 10)?;
    let wakeups = |s: &serde_json::Value| s["control_wakeups"].as_u64().context("control_wakeups");

    // Idle: a session up, no traffic.
    std::thread::sleep(Duration::from_secs(1));
    let (s0, t0) = (ga.show()?, std::time::Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let (s1, t1) = (ga.show()?, std::time::Instant::now());
    let rate = (wakeups(&s1)? - wakeups(&s0)?) as f64 / (t1 - t0).as_secs_f64();
    eprintln!("idle control loop: {rate:.1} wake-ups/s");
    assert!(
        rate < 5.0,
        "an idle control loop woke {rate:.1} times a second (a 50 ms tick would be 20)"
    );

    // A neighbour appears and goes: the workers' table follows.
    let neighbours = || -> Result<u64> { ga.show()?["neighbours"].as_u64().context("neighbours") };
    let before = neighbours()?;
    let at = std::time::Instant::now();
    t.gwa.run(&[
        "ip",
        "neigh",
        "replace",
        "10.1.0.77",
        "lladdr",
        "02:00:00:00:00:77",
        "dev",
        "lan0",
        "nud",
        "permanent",
    ])?;
    subway_testkit::wait_until(
        "the new neighbour in the workers' table",
        Duration::from_secs(2),
        || Ok(neighbours()? == before + 1),
    )?;
    eprintln!(
        "neighbour added: in the workers' table after {:?} (show round trips included)",
        at.elapsed()
    );
    t.gwa.run(&["ip", "neigh", "del", "10.1.0.77", "dev", "lan0"])?;
    subway_testkit::wait_until(
        "the neighbour gone from the workers' table",
        Duration::from_secs(2),
        || Ok(neighbours()? == before),
    )?;
    drop(gb);
    Ok(())
}
