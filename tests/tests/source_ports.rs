//! `SourcePorts`: subway sends one peer's tunnel from several UDP source
//! ports, one per inner flow, so that the receiving box's RSS spreads the
//! peer over its queues (one 5-tuple would pin it to one queue and one
//! core). The receiver sees a peer whose port moves: a stock wireguard-go
//! follows each datagram's source, and subway follows a port only once
//! the current one went quiet. Every port receives: data on the fast path
//! (XDP steers it to the workers), handshakes on the control thread's
//! sockets.
//!
//! On veth the receiving queue is the sending queue, so the spreading
//! itself is seen here on the wire (ports in a capture), not as RSS.

use anyhow::{Context, Result};
use std::time::Instant;
use subway_testkit::{Capture, Subway, TwoSites, WgPeer, ping, ping_until, require_root, tcp_echo, udp_ports_from};

const SPREAD: &str = "\n[Tuning]\nSourcePorts = 4\n";

/// A's source ports on the wire, over 51820-51823 only, at least two;
/// and the lines captured.
fn spread_seen(cap: Capture) -> Result<(std::collections::BTreeMap<u16, u32>, Vec<String>)> {
    let lines = cap.finish()?;
    let ports = udp_ports_from(&lines, "192.0.2.1");
    let head = lines.iter().take(5).cloned().collect::<Vec<_>>().join("\n");
    anyhow::ensure!(
        ports.keys().all(|p| (51820..=51823).contains(p)),
        "a source port outside 51820-51823: {ports:?}"
    );
    anyhow::ensure!(
        ports.len() >= 2,
        "one peer's flows left from one port: {ports:?} ({} lines captured:\n{head})",
        lines.len()
    );
    Ok((ports, lines))
}

/// Sixteen TCP flows from A to B and four back (each its own 5-tuple).
fn flows(t: &TwoSites) -> Result<()> {
    for i in 0..16 {
        let seen = tcp_echo(&t.a, &t.b, format!("10.2.0.2:{}", 6400 + i).parse()?, 32 * 1024)?;
        assert_eq!(seen.ip().to_string(), "10.1.0.2", "true source address");
    }
    for i in 0..4 {
        tcp_echo(&t.b, &t.a, format!("10.1.0.2:{}", 6500 + i).parse()?, 32 * 1024)?;
    }
    Ok(())
}

#[test]
fn a_stock_wireguard_go_handshakes_to_a_spread_port_and_follows_the_flows() -> Result<()> {
    if !require_root("a_stock_wireguard_go_handshakes_to_a_spread_port_and_follows_the_flows") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    // A knows no endpoint: wireguard-go initiates, to one of A's extra
    // ports (as it would after following A's flows there).
    let cfg = t
        .subway_config(true, false, "")
        .replace("Endpoint = 192.0.2.2:51820\n", "")
        + SPREAD;
    let ga = Subway::start(&t.gwa, &cfg)?;
    let wg = WgPeer::start(
        "wireguard-go",
        &t.gwb,
        &t.keys_b.0,
        51820,
        &t.keys_a.1,
        "192.0.2.1:51822",
        &["10.1.0.0/24", "fd01::/64"],
    )?;
    let diag = || {
        format!(
            "subway: {}\nwireguard-go log:\n{}",
            ga.show().map(|v| v.to_string()).unwrap_or_default(),
            wg.proc.log_text()
        )
    };
    // Not filtered by host: on these veths libpcap's `src host` missed
    // the frames the workers send; the lines are parsed instead.
    let cap = Capture::start(&t.gwb, "wan0", "udp")?;
    ping_until(&t.b, "10.1.0.2", 10).with_context(diag)?;
    ping(&t.a, "10.2.0.2", 3).with_context(diag)?;
    flows(&t).with_context(diag)?;
    let (ports, lines) = spread_seen(cap).with_context(diag)?;
    // The handshake response (92 bytes) left from the port the initiation
    // came to, as a NAT or stateful firewall on the peer's side expects.
    assert!(
        lines
            .iter()
            .any(|l| l.contains("192.0.2.1.51822 > 192.0.2.2.51820: UDP, length 92")),
        "no handshake response from 51822:\n{}",
        lines.iter().take(8).cloned().collect::<Vec<_>>().join("\n")
    );
    let s = ga.show()?;
    assert_eq!(s["source_ports"], 4, "{}", s);
    assert!(
        s["control"]["handshake_messages_in"].as_u64().unwrap_or(0) >= 1,
        "{}",
        s["control"]
    );
    // wireguard-go answered each flow to the port it came from: all of it
    // was opened by the workers, none by the control thread.
    assert_eq!(
        s["control"]["data_in_control"].as_u64().unwrap_or(0),
        0,
        "{}",
        s["control"]
    );
    let rx = s["totals"]["tunnel_rx"].as_u64().unwrap();
    assert!(rx > 200, "tunnel_rx {rx}, ports {ports:?}");
    Ok(())
}

#[test]
fn subway_to_subway_spread_flows_without_endpoint_churn() -> Result<()> {
    // A spreads, B receives: B follows A's port only when it went quiet.
    if !require_root("subway_to_subway_spread_flows_without_endpoint_churn") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    let ga = Subway::start(&t.gwa, &(t.subway_config(true, false, "") + SPREAD))?;
    let gb = Subway::start(&t.gwb, &t.subway_config(false, false, ""))?;
    let diag = || {
        format!(
            "A: {}\nB: {}",
            ga.show().map(|v| v.to_string()).unwrap_or_default(),
            gb.show().map(|v| v.to_string()).unwrap_or_default()
        )
    };
    ping_until(&t.a, "10.2.0.2", 10).with_context(diag)?;
    let t0 = Instant::now();
    flows(&t).with_context(diag)?;
    let secs = t0.elapsed().as_secs();
    // (B's XDP takes the datagrams before a capture on its uplink would
    // see them: the spreading itself is the test above.)
    let b = gb.show()?;
    let endpoint = b["peers"][0]["endpoint"].as_str().unwrap_or_default().to_string();
    assert!(
        ["51820", "51821", "51822", "51823"]
            .iter()
            .any(|p| endpoint == format!("192.0.2.1:{p}")),
        "B's endpoint for A: {endpoint}"
    );
    // B follows A to another port only once A's current one has been
    // quiet for a second: a handful of moves, not one per round.
    let roams = b["control"]["roams"].as_u64().unwrap_or(0);
    assert!(
        roams <= secs + 2,
        "B moved A's endpoint {roams} times in {secs} s: {}",
        b["control"]
    );
    for (name, s) in [("A", ga.show()?), ("B", b)] {
        assert_eq!(
            s["control"]["data_in_control"].as_u64().unwrap_or(0),
            0,
            "{name}: {}",
            s["control"]
        );
        for c in ["drop_wg_replayed", "drop_wg_decrypt_failed", "drop_wg_unknown_index"] {
            assert_eq!(s["totals"][c].as_u64().unwrap_or(0), 0, "{name}: {c}: {}", s["totals"]);
        }
    }
    Ok(())
}
