//! [Policy] in the data path, tried as an operator would: LAN A may reach
//! TCP 443 at the far site and nothing else, the far site (stock
//! wireguard-go) cannot open connections to LAN A, replies pass because
//! the flow is remembered, `route explain` names the deciding rule, and
//! `subway reload` adds and removes rules under a running flow without
//! losing a datagram of it.

use anyhow::{Context, Result};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};
use subway_testkit::{Netns, Subway, TwoSites, UdpFlow, ping, require_root, tcp_echo};

/// Whether a TCP connection from `client` to `addr` (a listener in
/// `server`) opens within a second and a half.
fn connects(client: &Netns, server: &Netns, addr: SocketAddr) -> Result<bool> {
    let bind: SocketAddr = format!("0.0.0.0:{}", addr.port()).parse()?;
    std::thread::scope(|s| -> Result<bool> {
        let (tx, rx) = std::sync::mpsc::channel();
        let srv = s.spawn(move || {
            server.enter(move || -> Result<()> {
                let l = TcpListener::bind(bind)?;
                l.set_nonblocking(true)?;
                tx.send(()).ok();
                let t0 = Instant::now();
                while t0.elapsed() < Duration::from_secs(3) {
                    if l.accept().is_ok() {
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(())
            })
        });
        rx.recv_timeout(Duration::from_secs(5))?;
        let ok = client.enter(|| TcpStream::connect_timeout(&addr, Duration::from_millis(1500)).is_ok())?;
        srv.join().unwrap()??;
        Ok(ok)
    })
}

#[test]
fn lan_a_reaches_tcp_443_and_nothing_else_and_the_far_site_cannot_open_connections() -> Result<()> {
    if !require_root("lan_a_reaches_tcp_443_and_nothing_else_and_the_far_site_cannot_open_connections") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    let cfg = t.subway_config(true, false, "")
        + "\n[Policy]\nDefault = deny\nRule = allow in lan0 from 10.1.0.0/24 to 10.2.0.0/24 proto tcp port 443\n";
    // The far side first: the first SYN brings the tunnel up, and an
    // initiation sent before wireguard-go listens is retried only after
    // 5 s (REKEY_TIMEOUT), longer than a connect waits.
    let _b = t.standard_b("wireguard-go")?;
    let ga = Subway::start(&t.gwa, &cfg)?;
    // TCP to 443 works both ways through the tunnel (the first SYN also
    // brings the tunnel up), IPv4 and IPv6 alike... IPv6 is not allowed
    // by the rule, so it is refused like anything else.
    tcp_echo(&t.a, &t.b, "10.2.0.2:443".parse()?, 300_000).with_context(|| ga.diag())?;
    assert!(
        !connects(&t.a, &t.b, "10.2.0.2:22".parse()?)?,
        "port 22 was let through"
    );
    assert!(
        !connects(&t.a, &t.b, "[fd02::2]:443".parse()?)?,
        "IPv6 matched an IPv4 rule"
    );
    assert!(
        !connects(&t.b, &t.a, "10.1.0.2:443".parse()?)?,
        "the far site opened a connection to LAN A"
    );
    assert!(ping(&t.a, "10.2.0.2", 1).is_err(), "ICMP was let through");
    // The tunnel carried the allowed flow: the echo came back.
    tcp_echo(&t.a, &t.b, "10.2.0.2:443".parse()?, 100_000)?;

    // What show says: the rule's packets and bytes, the default's drops,
    // the flows, drop_policy among the drops.
    let v = ga.show()?;
    let pol = &v["policies"][0];
    let rule = &pol["rules"][0];
    assert!(rule["packets"].as_u64().unwrap_or(0) > 100, "{pol}");
    assert!(rule["bytes"].as_u64().unwrap_or(0) > 400_000, "{pol}");
    assert!(pol["default_packets"].as_u64().unwrap_or(0) >= 4, "{pol}");
    assert!(pol["established"].as_u64().unwrap_or(0) > 100, "{pol}");
    assert!(ga.total("drop_policy")? >= 4, "{v}");
    assert!(v["flows"]["inserted"].as_u64().unwrap_or(0) >= 2, "{}", v["flows"]);
    let text = ga.ctl(&["show", &ga.name])?;
    assert!(text.contains("policy VNET default: default deny"), "{text}");
    assert!(text.contains("allow in lan0 from 10.1.0.0/24"), "{text}");
    assert!(text.contains("drop_policy="), "{text}");
    let metrics_free = text.contains("flows: ");
    assert!(metrics_free, "{text}");

    // route explain runs the same check and names the rule.
    let explain = |port: &str| {
        ga.ctl(&[
            "route", "explain", "--name", &ga.name, "--src", "10.1.0.2", "--dst", "10.2.0.2", "--proto", "tcp",
            "--port", port,
        ])
    };
    let e = explain("443")?;
    assert!(
        e.contains("policy: rule 1 (line ")
            && e.contains("allow in lan0 from 10.1.0.0/24 to 10.2.0.0/24 proto tcp port 443) allows"),
        "{e}"
    );
    let e = explain("22")?;
    assert!(
        e.contains("no rule matches; VNET default deny: dropped (drop_policy)"),
        "{e}"
    );
    Ok(())
}

#[test]
fn reload_adds_and_removes_rules_under_a_running_flow_without_losing_it() -> Result<()> {
    if !require_root("reload_adds_and_removes_rules_under_a_running_flow_without_losing_it") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    let head = t.subway_config(true, false, "")
        + "\n[Policy]\nDefault = deny\nRule = allow proto icmp\nRule = allow in lan0 proto udp port 7000\n";
    let ga = Subway::start(&t.gwa, &head)?;
    let _gb = Subway::start(&t.gwb, &t.subway_config(false, false, ""))?;
    subway_testkit::ping_until(&t.a, "10.2.0.2", 10)?;
    let flow = UdpFlow::start(&t.a, &t.b, "10.2.0.2:7000".parse()?, 3000, 1000, 200)?;
    std::thread::sleep(Duration::from_millis(500));
    // 1. A rule for something else, on top.
    std::fs::write(
        &ga.config,
        head.replace(
            "Rule = allow proto icmp",
            "Rule = deny proto udp port 7001\nRule = allow proto icmp",
        ),
    )?;
    let out = ga.ctl(&["reload", &ga.name])?;
    assert!(out.contains("[Policy] changed in VNET: default"), "{out}");
    std::thread::sleep(Duration::from_millis(500));
    // 2. The flow's own port denied: new flows to 7000 are refused, the
    // running one (already allowed, remembered) goes on, as with
    // conntrack's established state.
    std::fs::write(
        &ga.config,
        head.replace(
            "Rule = allow proto icmp",
            "Rule = deny proto udp port 7000\nRule = allow proto icmp",
        ),
    )?;
    ga.ctl(&["reload", &ga.name])?;
    std::thread::sleep(Duration::from_millis(300));
    let drops = ga.total("drop_policy")?;
    // A new flow to port 7000 (another source port): 20 datagrams of
    // sequence 0, which the running flow's sink would count twice.
    t.a.enter(|| -> Result<()> {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        for _ in 0..20 {
            s.send_to(&[0u8; 100], "10.2.0.2:7000")?;
        }
        Ok(())
    })??;
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        ga.total("drop_policy")? >= drops + 20,
        "the new flow to a denied port was not refused"
    );
    // 3. Back as it was.
    std::fs::write(&ga.config, &head)?;
    ga.ctl(&["reload", &ga.name])?;
    let r = flow.finish()?;
    assert_eq!(
        (r.received, r.lost, r.duplicates),
        (3000, 0, 0),
        "the allowed flow across three reloads: {r:?}"
    );
    // The flow's rule kept its counters across the reloads (same text).
    let v = ga.show()?;
    let rules = v["policies"][0]["rules"].as_array().cloned().unwrap_or_default();
    let udp = rules
        .iter()
        .find(|r| {
            r["rule"]
                .as_str()
                .is_some_and(|s| s.ends_with("allow in lan0 proto udp port 7000"))
        })
        .unwrap_or_else(|| panic!("{rules:?}"));
    assert!(udp["packets"].as_u64().unwrap_or(0) >= 3000, "{udp}");
    Ok(())
}
