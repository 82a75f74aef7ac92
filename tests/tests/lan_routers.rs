//! Sites with more than one subnet: hosts behind a router on the LAN,
//! reached by the fast path through that router, end to end in namespaces.
//!
//! ```text
//!  h (10.1.5.10 fd05::10) ─ rt0 [a: the LAN router] eth0 ─ lan0 [gwa] wan0 ══ wan0 [gwb] lan0 ─ b
//!                          10.1.5.1 fd05::1   10.1.0.2 fd01::2   10.1.0.1 fd01::1
//! ```
//! Gateway A has the operator's kernel route `10.1.5.0/24 via 10.1.0.2`
//! (and `fd05::/64 via fd01::2`) and lists the prefix in `Subnets`.

use anyhow::{Context, Result};
use std::time::{Duration, Instant};
use subway_testkit::{Netns, Subway, TwoSites, ping, ping_until, require_root, tcp_echo, veth, wait_until};

/// TwoSites plus a host `h` behind `a`, which routes for it.
fn behind_a_router() -> Result<(TwoSites, Netns)> {
    let t = TwoSites::new()?;
    let h = Netns::new("h")?;
    veth(&t.a, "rt0", &h, "eth0")?;
    t.a.sh("ip addr add 10.1.5.1/24 dev rt0 && ip -6 addr add fd05::1/64 dev rt0 nodad")?;
    t.a.sysctl("net.ipv4.ip_forward", "1")?;
    t.a.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    h.sh("ip addr add 10.1.5.10/24 dev eth0 && ip -6 addr add fd05::10/64 dev eth0 nodad && ip route add default via 10.1.5.1 && ip -6 route add default via fd05::1")?;
    t.gwa
        .sh("ip route add 10.1.5.0/24 via 10.1.0.2 dev lan0 && ip -6 route add fd05::/64 via fd01::2 dev lan0")?;
    Ok((t, h))
}

fn totals(gw: &Subway, k: &str) -> u64 {
    gw.show().map(|s| s["totals"][k].as_u64().unwrap_or(0)).unwrap_or(0)
}

#[test]
fn a_host_behind_a_lan_router_is_reached_by_the_fast_path_both_ways_v4_and_v6() -> Result<()> {
    if !require_root("a_host_behind_a_lan_router_is_reached_by_the_fast_path_both_ways_v4_and_v6") {
        return Ok(());
    }
    let (t, h) = behind_a_router()?;
    let cfg_a = t.subway_config(true, false, "").replace(
        "Interface = lan0\n",
        "Interface = lan0\nSubnets = 10.1.0.0/24, fd01::/64, 10.1.5.0/24, fd05::/64\n",
    );
    let cfg_b = t.subway_config(false, false, "").replace(
        "AllowedIPs = 10.1.0.0/24, fd01::/64",
        "AllowedIPs = 10.1.0.0/24, fd01::/64, 10.1.5.0/24, fd05::/64",
    );
    let ga = Subway::start(&t.gwa, &cfg_a)?;
    let gb = Subway::start(&t.gwb, &cfg_b)?;
    let diag = || {
        format!(
            "A: {}\nA log:\n{}",
            ga.show().map(|v| v.to_string()).unwrap_or_default(),
            ga.proc.log_text()
        )
    };

    // Both ways, both families.
    ping_until(&t.b, "10.1.5.10", 10).with_context(diag)?;
    ping(&t.b, "10.1.5.10", 5).with_context(diag)?;
    ping(&h, "10.2.0.2", 5).with_context(diag)?;
    ping_until(&t.b, "fd05::10", 10).with_context(diag)?;
    ping(&h, "fd02::2", 5).with_context(diag)?;

    // The route's answer: through the router, from the kernel, resolved.
    let got: serde_json::Value =
        serde_json::from_str(&ga.ctl(&["route", "get", "10.1.5.10", "--name", &ga.name, "--json"])?)?;
    assert_eq!(got["route"]["source"], "kernel", "{got}");
    assert_eq!(got["route"]["next_hops"][0]["address"], "10.1.0.2", "{got}");
    assert_eq!(got["route"]["next_hops"][0]["resolved"], true, "{got}");

    // A TCP transfer from B's host to the host behind the router: the
    // slow path takes at most the first packets (before the router's
    // neighbour entry; here it exists already, so the tolerance is small),
    // the rest is forwarded by the workers.
    let slow_before = totals(&ga, "slow_neigh_unknown");
    let fwd_before = totals(&ga, "forwarded_v4");
    let bytes = 8 << 20;
    let start = Instant::now();
    let seen = tcp_echo(&t.b, &h, "10.1.5.10:7001".parse()?, bytes)?;
    let behind = start.elapsed();
    assert_eq!(
        seen.ip().to_string(),
        "10.2.0.2",
        "the host sees B's host's own address"
    );
    let slow = totals(&ga, "slow_neigh_unknown") - slow_before;
    let fwd = totals(&ga, "forwarded_v4") - fwd_before;
    assert!(
        slow <= 10,
        "{slow} packets of the transfer took the slow path\n{}",
        diag()
    );
    assert!(fwd > 1000, "only {fwd} packets forwarded by the fast path\n{}", diag());
    // The same transfer to a directly connected host, for the figure.
    let start = Instant::now();
    tcp_echo(&t.b, &t.a, "10.1.0.2:7002".parse()?, bytes)?;
    let direct = start.elapsed();
    eprintln!(
        "8 MiB echo: behind the router {:.0} ms, directly connected {:.0} ms; slow path {slow}, fast path {fwd}",
        behind.as_secs_f64() * 1e3,
        direct.as_secs_f64() * 1e3
    );
    // IPv6 too.
    let slow_before = totals(&ga, "slow_neigh_unknown");
    tcp_echo(&t.b, &h, "[fd05::10]:7003".parse()?, 1 << 20)?;
    assert!(totals(&ga, "slow_neigh_unknown") - slow_before <= 10, "{}", diag());
    let _ = gb;
    Ok(())
}

#[test]
fn kernel_routes_through_a_lan_router_are_followed_as_they_come_and_go() -> Result<()> {
    if !require_root("kernel_routes_through_a_lan_router_are_followed_as_they_come_and_go") {
        return Ok(());
    }
    let (t, h) = behind_a_router()?;
    // A second prefix on h, routed by the kernel first to nowhere subway
    // serves, then through the router: subway follows the change.
    h.sh("ip addr add 10.1.6.10/24 dev eth0")?;
    t.a.sh("ip route add 10.1.6.0/24 dev rt0")?;
    let cfg_a = t.subway_config(true, false, "").replace(
        "Interface = lan0\n",
        "Interface = lan0\nSubnets = 10.1.0.0/24, 10.1.5.0/24, 10.1.6.0/24\n",
    );
    let cfg_b = t.subway_config(false, false, "").replace(
        "AllowedIPs = 10.1.0.0/24, fd01::/64",
        "AllowedIPs = 10.1.0.0/24, fd01::/64, 10.1.5.0/24, 10.1.6.0/24",
    );
    let ga = Subway::start(&t.gwa, &cfg_a)?;
    let _gb = Subway::start(&t.gwb, &cfg_b)?;
    ping_until(&t.b, "10.1.5.10", 10)?;
    let route_of = || {
        ga.ctl(&["route", "get", "10.1.6.10", "--name", &ga.name, "--json"])
            .unwrap_or_default()
    };
    // Before: 10.1.6.0/24 is a LAN subnet the kernel has no route for.
    assert!(!route_of().contains("\"kernel\""), "{}", route_of());
    let t0 = Instant::now();
    t.gwa.sh("ip route add 10.1.6.0/24 via 10.1.0.2 dev lan0")?;
    wait_until("subway follows the new kernel route", Duration::from_secs(2), || {
        Ok(route_of().contains("\"kernel\""))
    })?;
    eprintln!(
        "kernel route followed within {:.1} ms (polled with subway route get)",
        t0.elapsed().as_secs_f64() * 1e3
    );
    ping(&t.b, "10.1.6.10", 3)?;
    // Followed: the fast path forwards through the router from now on.
    let slow_before = totals(&ga, "slow_neigh_unknown");
    ping(&t.b, "10.1.6.10", 5)?;
    assert_eq!(totals(&ga, "slow_neigh_unknown"), slow_before, "{}", route_of());
    // And a route that goes away is no longer followed.
    t.gwa.sh("ip route del 10.1.6.0/24 via 10.1.0.2 dev lan0")?;
    wait_until("subway drops the removed kernel route", Duration::from_secs(2), || {
        Ok(!route_of().contains("\"kernel\""))
    })?;
    Ok(())
}
