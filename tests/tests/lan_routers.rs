//! Sites with more than one subnet: hosts behind a router on the LAN,
//! reached by the fast path through that router, end to end in namespaces.
//!
//! ```text
//!  h (10.1.5.10 fd05::10) ─ rt0 [a: the LAN router] eth0 ─ lan0 [gwa] wan0 ══ wan0 [gwb] lan0 ─ b
//!                          10.1.5.1 fd05::1   10.1.0.2 fd01::2   10.1.0.1 fd01::1
//! ```
//! Gateway A has the operator's kernel route `10.1.5.0/24 via 10.1.0.2`
//! (and `fd05::/64 via fd01::2`) and lists the prefix in `Subnets`.
//!
//! [`TwoRouters`]: A's LAN is a switch (a bridge in `a`) with two routers
//! on it, both of which reach `h`'s subnet (a bridge in `h`):
//!
//! ```text
//!                 ┌ r1 10.1.0.3 fd01::3 ─ 10.1.5.1 fd05::1 ┐
//!  [gwa] lan0 ─ a (br0 10.1.0.2)                          h (br0 10.1.5.10 fd05::10)
//!                 └ r2 10.1.0.4 fd01::4 ─ 10.1.5.2 fd05::2 ┘
//! ```

use anyhow::{Context, Result};
use std::time::{Duration, Instant};
use subway_testkit::{
    Capture, Netns, Subway, TwoSites, UdpFlow, host, log_time, ping, ping_until, require_root, tcp_echo, udp_ports_to,
    veth, wait_until,
};

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

/// Gateway A's config with these `Subnets` on its LAN.
fn a_with_subnets(t: &TwoSites, subnets: &str) -> String {
    t.subway_config(true, false, "").replace(
        "Interface = lan0\n",
        &format!("Interface = lan0\nSubnets = {subnets}\n"),
    )
}

/// Gateway B's config with these prefixes behind A as well.
fn b_with_more_behind_a(t: &TwoSites, more: &str) -> String {
    t.subway_config(false, false, "").replace(
        "AllowedIPs = 10.1.0.0/24, fd01::/64",
        &format!("AllowedIPs = 10.1.0.0/24, fd01::/64, {more}"),
    )
}

/// TwoSites with A's LAN as a switch, two routers `r1` (10.1.0.3) and
/// `r2` (10.1.0.4) on it, and `h` behind both. Routers forward; `h`
/// answers through r1. Gateway A gets no route to `h` here: each test
/// says how it learns one.
struct TwoRouters {
    t: TwoSites,
    r1: Netns,
    r2: Netns,
    h: Netns,
}

impl TwoRouters {
    fn new() -> Result<TwoRouters> {
        let t = TwoSites::new()?;
        let (r1, r2, h) = (Netns::new("r1")?, Netns::new("r2")?, Netns::new("h")?);
        // a: its eth0 (to gwa) and the routers' links on one bridge.
        t.a.sh("ip addr flush dev eth0 && ip link add br0 type bridge && ip link set eth0 master br0")?;
        h.sh("ip link add br0 type bridge")?;
        for (i, r) in [(1, &r1), (2, &r2)] {
            veth(&t.a, &format!("p{i}"), r, "eth0")?;
            veth(&h, &format!("p{i}"), r, "eth1")?;
            t.a.run(&["ip", "link", "set", &format!("p{i}"), "master", "br0"])?;
            h.run(&["ip", "link", "set", &format!("p{i}"), "master", "br0"])?;
            r.sh(&format!(
                "ip addr add 10.1.0.{}/24 dev eth0 && ip -6 addr add fd01::{}/64 dev eth0 nodad && \
                 ip addr add 10.1.5.{i}/24 dev eth1 && ip -6 addr add fd05::{i}/64 dev eth1 nodad && \
                 ip route add default via 10.1.0.1 && ip -6 route add default via fd01::1",
                i + 2,
                i + 2
            ))?;
            r.sysctl("net.ipv4.ip_forward", "1")?;
            r.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }
        t.a.sh(
            "ip link set br0 up && ip addr add 10.1.0.2/24 dev br0 && ip -6 addr add fd01::2/64 dev br0 nodad && \
             ip route replace default via 10.1.0.1 && ip -6 route replace default via fd01::1",
        )?;
        h.sh(
            "ip link set br0 up && ip addr add 10.1.5.10/24 dev br0 && ip -6 addr add fd05::10/64 dev br0 nodad && \
             ip route add default via 10.1.5.1 && ip -6 route add default via fd05::1",
        )?;
        Ok(TwoRouters { t, r1, r2, h })
    }

    /// B's subway config, with h's subnet behind A.
    fn config_b(&self) -> String {
        b_with_more_behind_a(&self.t, "10.1.5.0/24, fd05::/64")
    }

    /// Gateway A's kernel knows both routers' MACs (as after any traffic).
    fn resolve_routers(&self) -> Result<()> {
        self.t
            .gwa
            .sh("ping -c1 -W1 10.1.0.3 >/dev/null && ping -c1 -W1 10.1.0.4 >/dev/null")?;
        Ok(())
    }
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
    let cfg_a = a_with_subnets(&t, "10.1.0.0/24, fd01::/64, 10.1.5.0/24, fd05::/64");
    let cfg_b = b_with_more_behind_a(&t, "10.1.5.0/24, fd05::/64");
    let ga = Subway::start(&t.gwa, &cfg_a)?;
    let gb = Subway::start(&t.gwb, &cfg_b)?;
    let diag = || ga.diag();

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
    let cfg_a = a_with_subnets(&t, "10.1.0.0/24, 10.1.5.0/24, 10.1.6.0/24");
    let cfg_b = b_with_more_behind_a(&t, "10.1.5.0/24, 10.1.6.0/24");
    // The work counted below is the changes' alone: the LAN's link-local
    // address, whose arrival rebuilds the FIB, comes before the start.
    assert!(t.gwa.settle_dad(), "IPv6 addresses still tentative after 5 s");
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
    // Replaced by a route elsewhere (the kernel's event says only where
    // it goes now), it is no longer followed; replaced back, it is.
    t.gwa.sh("ip route replace 10.1.6.0/24 via 192.0.2.2 dev wan0")?;
    wait_until(
        "subway drops the route that left the LAN",
        Duration::from_secs(2),
        || Ok(!route_of().contains("\"kernel\"")),
    )?;
    t.gwa.sh("ip route replace 10.1.6.0/24 via 10.1.0.2 dev lan0")?;
    wait_until("subway follows the route back", Duration::from_secs(2), || {
        Ok(route_of().contains("\"kernel\""))
    })?;
    // And a route that goes away is no longer followed.
    t.gwa.sh("ip route del 10.1.6.0/24 via 10.1.0.2 dev lan0")?;
    wait_until("subway drops the removed kernel route", Duration::from_secs(2), || {
        Ok(!route_of().contains("\"kernel\""))
    })?;
    // Route changes the FIB is not built from (the uplink's side, a
    // blackhole) cost no rebuild, and no lookup of the peer's endpoint
    // unless they cover it.
    let (fib0, lookups0) = kernel_work(&ga)?;
    for _ in 0..10 {
        t.gwa.sh(
            "ip route add 198.51.100.0/24 via 192.0.2.2 dev wan0 && ip route add blackhole 203.0.113.0/24 && \
             ip route del 198.51.100.0/24 && ip route del blackhole 203.0.113.0/24",
        )?;
    }
    ping(&t.b, "10.1.5.10", 2)?;
    assert_eq!(
        kernel_work(&ga)?,
        (fib0, lookups0),
        "20 route changes away from the LANs and the endpoint"
    );
    // A route that covers the endpoint (192.0.2.2): looked up again, once.
    t.gwa.sh("ip route add 192.0.2.0/28 dev wan0")?;
    wait_until(
        "the endpoint's route is looked up again",
        Duration::from_secs(2),
        || Ok(kernel_work(&ga)?.1 > lookups0),
    )?;
    ping(&t.b, "10.1.5.10", 2)?;
    assert_eq!(kernel_work(&ga)?, (fib0, lookups0 + 1));
    Ok(())
}

/// `subway show`'s cost of following the kernel's routes: FIB rebuilds,
/// endpoint route lookups.
fn kernel_work(gw: &Subway) -> Result<(u64, u64)> {
    let v = gw.show()?;
    let k = &v["kernel_routes"];
    Ok((
        k["fib_rebuilds"].as_u64().context("fib_rebuilds")?,
        k["endpoint_lookups"].as_u64().context("endpoint_lookups")?,
    ))
}

/// All the workers' slow-path counters of `gw`, summed.
fn slow_total(gw: &Subway) -> u64 {
    gw.show()
        .ok()
        .and_then(|s| {
            s["totals"].as_object().map(|m| {
                m.iter()
                    .filter(|(k, _)| k.starts_with("slow_"))
                    .filter_map(|(_, v)| v.as_u64())
                    .sum()
            })
        })
        .unwrap_or(0)
}

#[test]
fn a_configured_route_in_a_vnet_reaches_a_host_behind_a_router_and_moves_on_reload() -> Result<()> {
    if !require_root("a_configured_route_in_a_vnet_reaches_a_host_behind_a_router_and_moves_on_reload") {
        return Ok(());
    }
    let r = TwoRouters::new()?;
    let t = &r.t;
    // A's LAN and its peer in VNET red; the prefixes behind the routers
    // are configured routes (the kernel has no part in a non-default VNET).
    let lan = |via4: &str, via6: &str| {
        format!("Interface = lan0\nVNet = red\nRoute = 10.1.5.0/24 via {via4}\nRoute = fd05::/64 via {via6}\n")
    };
    let cfg_a = t
        .subway_config(true, false, "VNet = red")
        .replace("Interface = lan0\n", &lan("10.1.0.3", "fd01::3"));
    let ga = Subway::start(&t.gwa, &cfg_a)?;
    let _gb = Subway::start(&t.gwb, &r.config_b())?;
    let diag = || ga.diag();
    ping_until(&t.b, "10.1.5.10", 10).with_context(diag)?;
    ping(&t.b, "10.1.5.10", 3).with_context(diag)?;
    ping(&r.h, "10.2.0.2", 3).with_context(diag)?;
    ping_until(&t.b, "fd05::10", 10).with_context(diag)?;
    ping(&r.h, "fd02::2", 3).with_context(diag)?;

    let got: serde_json::Value = serde_json::from_str(&ga.ctl(&[
        "route",
        "get",
        "10.1.5.10",
        "--vnet",
        "red",
        "--name",
        &ga.name,
        "--json",
    ])?)?;
    assert_eq!(got["route"]["source"], "config", "{got}");
    assert_eq!(got["route"]["next_hops"][0]["address"], "10.1.0.3", "{got}");
    assert_eq!(got["route"]["next_hops"][0]["resolved"], true, "{got}");

    // TCP both families: the router's MAC is known by now, so nothing of
    // the transfer takes the slow path (tolerance: 10 packets).
    let bytes = 8 << 20;
    let slow_before = slow_total(&ga);
    let start = Instant::now();
    let seen = tcp_echo(&t.b, &r.h, "10.1.5.10:7001".parse()?, bytes)?;
    let behind = start.elapsed();
    assert_eq!(
        seen.ip().to_string(),
        "10.2.0.2",
        "the host sees B's host's own address"
    );
    tcp_echo(&t.b, &r.h, "[fd05::10]:7002".parse()?, 1 << 20)?;
    let slow = slow_total(&ga) - slow_before;
    assert!(
        slow <= 10,
        "{slow} packets of the transfers took the slow path\n{}",
        diag()
    );
    let start = Instant::now();
    tcp_echo(&t.b, &t.a, "10.1.0.2:7003".parse()?, bytes)?;
    let direct = start.elapsed();
    eprintln!(
        "VNET red, 8 MiB echo: behind the router {:.0} ms, directly connected {:.0} ms; slow path {slow}",
        behind.as_secs_f64() * 1e3,
        direct.as_secs_f64() * 1e3
    );

    // `subway reload` moves the route to r2 under a paced flow: nothing lost.
    let cap = Capture::start(&r.r2, "eth0", "udp and dst host 10.1.5.10")?;
    let flow = UdpFlow::start(&t.b, &r.h, "10.1.5.10:7004".parse()?, 2000, 1000, 64)?;
    std::thread::sleep(Duration::from_millis(700));
    std::fs::write(
        &ga.config,
        cfg_a.replace(&lan("10.1.0.3", "fd01::3"), &lan("10.1.0.4", "fd01::4")),
    )?;
    let out = ga.ctl(&["reload", &ga.name])?;
    assert!(out.contains("10.1.5.0/24"), "reload did not retarget the route: {out}");
    let report = flow.finish()?;
    let at_r2 = udp_ports_to(&cap.finish()?, "10.1.5.10");
    assert_eq!(report.lost, 0, "{report:?}\n{}", diag());
    let moved = at_r2.get(&7004).copied().unwrap_or(0);
    assert!(
        moved > 500,
        "only {moved} of the flow's datagrams went through r2 after the reload: {report:?}"
    );
    eprintln!("reload moved the route to r2 under a 1000/s flow: {report:?}, {moved} through r2");
    ping(&r.h, "fd02::2", 2).with_context(diag)?;
    ping(&t.b, "fd05::10", 2).with_context(diag)?;
    Ok(())
}

#[test]
fn ecmp_over_two_lan_routers_spreads_flows_and_keeps_each_on_one_router() -> Result<()> {
    if !require_root("ecmp_over_two_lan_routers_spreads_flows_and_keeps_each_on_one_router") {
        return Ok(());
    }
    let r = TwoRouters::new()?;
    let t = &r.t;
    t.gwa
        .sh("ip route add 10.1.5.0/24 nexthop via 10.1.0.3 dev lan0 nexthop via 10.1.0.4 dev lan0")?;
    r.resolve_routers()?;
    let cfg_a = a_with_subnets(t, "10.1.0.0/24, fd01::/64, 10.1.5.0/24");
    let ga = Subway::start(&t.gwa, &cfg_a)?;
    let _gb = Subway::start(&t.gwb, &r.config_b())?;
    let diag = || ga.diag();
    ping_until(&t.b, "10.1.5.10", 10).with_context(diag)?;
    let got: serde_json::Value =
        serde_json::from_str(&ga.ctl(&["route", "get", "10.1.5.10", "--name", &ga.name, "--json"])?)?;
    assert_eq!(got["route"]["next_hops"].as_array().map(|a| a.len()), Some(2), "{got}");

    let caps = [
        Capture::start(&r.r1, "eth0", "udp and dst host 10.1.5.10")?,
        Capture::start(&r.r2, "eth0", "udp and dst host 10.1.5.10")?,
    ];
    // 16 flows (one destination port each), 100 datagrams each, at once.
    let slow_before = slow_total(&ga);
    let flows = (0..16u16)
        .map(|i| UdpFlow::start(&t.b, &r.h, format!("10.1.5.10:{}", 9100 + i).parse()?, 100, 200, 64))
        .collect::<Result<Vec<_>>>()?;
    let mut lost = 0;
    for f in flows {
        lost += f.finish()?.lost;
    }
    let [c1, c2] = caps;
    let (at1, at2) = (
        udp_ports_to(&c1.finish()?, "10.1.5.10"),
        udp_ports_to(&c2.finish()?, "10.1.5.10"),
    );
    eprintln!("ECMP: flows through r1 {at1:?}, through r2 {at2:?}, lost {lost}");
    assert!(lost <= 16 * 5, "{lost} of 1600 datagrams lost\n{}", diag());
    for port in 9100..9116u16 {
        assert!(
            at1.contains_key(&port) != at2.contains_key(&port),
            "flow to port {port} went through {} (r1 {at1:?}, r2 {at2:?})",
            if at1.contains_key(&port) {
                "both routers"
            } else {
                "neither router"
            }
        );
    }
    assert!(
        !at1.is_empty() && !at2.is_empty(),
        "16 flows all went through one router: r1 {at1:?}, r2 {at2:?}"
    );
    let slow = slow_total(&ga) - slow_before;
    assert!(slow <= 10, "{slow} datagrams took the slow path\n{}", diag());
    Ok(())
}

#[test]
fn a_next_hop_moved_in_the_kernel_is_followed_under_a_paced_flow() -> Result<()> {
    if !require_root("a_next_hop_moved_in_the_kernel_is_followed_under_a_paced_flow") {
        return Ok(());
    }
    let r = TwoRouters::new()?;
    let t = &r.t;
    t.gwa.sh("ip route add 10.1.5.0/24 via 10.1.0.3 dev lan0")?;
    r.resolve_routers()?;
    let cfg_a = a_with_subnets(t, "10.1.0.0/24, fd01::/64, 10.1.5.0/24");
    let ga = Subway::start(&t.gwa, &cfg_a)?;
    let _gb = Subway::start(&t.gwb, &r.config_b())?;
    ping_until(&t.b, "10.1.5.10", 10)?;

    // 3000 datagrams at 1000/s; after one second r1 dies and the route
    // moves to r2 (as a routing daemon would move it): every datagram
    // sent to r1 in between is lost, so the loss is the time subway took
    // to follow, plus the time between the two commands.
    let monitor_log = subway_testkit::work_dir().join(format!("{}.log", subway_testkit::unique("mon")));
    let monitor = t.gwa.spawn(&["ip", "-ts", "monitor", "route"], &monitor_log)?;
    let flow = UdpFlow::start(&t.b, &r.h, "10.1.5.10:9200".parse()?, 3000, 1000, 64)?;
    std::thread::sleep(Duration::from_secs(1));
    let cut = Instant::now();
    host(&[
        "sh",
        "-c",
        &format!(
            "ip -n {} link set eth0 down && ip -n {} route replace 10.1.5.0/24 via 10.1.0.4 dev lan0",
            r.r1.name, t.gwa.name
        ),
    ])?;
    let commands = cut.elapsed();
    let report = flow.finish()?;
    // Every arrival after the cut came through r2 (r1 is down).
    let gap = report.longest_gap();
    let via_r2 = report.arrivals.iter().filter(|(_, at)| *at > cut).count();
    assert!(
        via_r2 > 1500,
        "only {via_r2} datagrams arrived after the move: {report:?}"
    );
    // subway's own share: from the kernel's route event (ip monitor's
    // timestamp) to subway's log line saying it followed.
    let event = monitor
        .log_text()
        .lines()
        .find(|l| l.contains("10.1.5.0/24 via 10.1.0.4"))
        .and_then(log_time);
    let followed = ga
        .proc
        .log_text()
        .lines()
        .filter(|l| l.contains("followed the kernel's routes"))
        .filter_map(log_time)
        .find(|t| event.is_some_and(|e| *t >= e));
    let share = match (event, followed) {
        (Some(e), Some(f)) => format!("{:.1} ms", (f - e) * 1e3),
        _ => "not logged".into(),
    };
    eprintln!(
        "next hop moved under 1000/s: {report:?}; longest gap {:.1} ms; the two commands took {:.1} ms; \
         subway followed the kernel's route event in {share}",
        gap.as_secs_f64() * 1e3,
        commands.as_secs_f64() * 1e3
    );
    // Tolerance: 10 ms of following, the commands' own time, and 10 ms of
    // scheduling noise on a small shared machine.
    let allowed = 20 + commands.as_millis() as u32;
    assert!(
        report.lost <= allowed,
        "{} datagrams lost (allowed {allowed}): {report:?}\nA log:\n{}",
        report.lost,
        ga.proc.log_text()
    );
    Ok(())
}

#[test]
fn a_router_that_never_answers_is_counted_and_asked_again_at_a_bounded_rate() -> Result<()> {
    if !require_root("a_router_that_never_answers_is_counted_and_asked_again_at_a_bounded_rate") {
        return Ok(());
    }
    let r = TwoRouters::new()?;
    let t = &r.t;
    // 10.1.0.9 is on the LAN's subnet, but nobody has it.
    let cfg_a = t.subway_config(true, false, "VNet = red").replace(
        "Interface = lan0\n",
        "Interface = lan0\nVNet = red\nRoute = 10.1.5.0/24 via 10.1.0.9\n",
    );
    let ga = Subway::start(&t.gwa, &cfg_a)?;
    let _gb = Subway::start(&t.gwb, &r.config_b())?;
    ping_until(&t.b, "10.1.0.2", 10)?;
    let got: serde_json::Value = serde_json::from_str(&ga.ctl(&[
        "route",
        "get",
        "10.1.5.10",
        "--vnet",
        "red",
        "--name",
        &ga.name,
        "--json",
    ])?)?;
    assert_eq!(got["route"]["next_hops"][0]["resolved"], false, "{got}");

    // 2 s of 500 datagrams/s toward the dead router: each is counted
    // (held, then dropped as unresolved or for want of room), the router
    // is asked for about twice a second, and the control thread is not
    // woken for every packet in a loop.
    let punt = |k: &str| {
        ga.show()
            .map(|s| s["vnet_slow_path"][k].as_u64().unwrap_or(0))
            .unwrap_or(0)
    };
    let wakeups = || {
        ga.show()
            .map(|s| s["control_wakeups"].as_u64().unwrap_or(0))
            .unwrap_or(0)
    };
    let (asked0, w0) = (punt("resolutions"), wakeups());
    let sent = t.b.enter(|| -> Result<u32> {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        for seq in 0..1000u32 {
            s.send_to(&seq.to_be_bytes(), "10.1.5.10:9300")?;
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(1000)
    })??;
    std::thread::sleep(Duration::from_secs(3)); // the last held ones time out
    let (asked, woken) = (punt("resolutions") - asked0, wakeups() - w0);
    let dropped = punt("unresolved") + punt("overflow");
    eprintln!("dead router: {sent} sent, asked {asked} times, {dropped} dropped, control thread woken {woken} times");
    assert!(dropped >= 1000, "only {dropped} of {sent} datagrams counted as dropped");
    assert!((2..=12).contains(&asked), "the router was asked {asked} times in ~5 s");
    assert!(woken < 5000, "the control thread woke {woken} times for 1000 datagrams");
    // Still serving the rest of the VNET.
    ping(&t.b, "10.1.0.2", 2)?;
    Ok(())
}

#[test]
fn a_configured_route_in_the_default_vnet_is_the_kernels_too_and_leaves_with_subway() -> Result<()> {
    if !require_root("a_configured_route_in_the_default_vnet_is_the_kernels_too_and_leaves_with_subway") {
        return Ok(());
    }
    let r = TwoRouters::new()?;
    let t = &r.t;
    let cfg = |routers: &str| {
        t.subway_config(true, false, "").replace(
            "Interface = lan0\n",
            &format!("Interface = lan0\nRoute = 10.1.5.0/24 via {routers}\n"),
        )
    };
    let kernel_route = || t.gwa.run(&["ip", "route", "show", "10.1.5.0/24"]).unwrap_or_default();
    let ga = Subway::start(&t.gwa, &cfg("10.1.0.3"))?;
    let _gb = Subway::start(&t.gwb, &r.config_b())?;
    // The kernel, the slow path of the default VNET, has the route too.
    assert!(kernel_route().contains("via 10.1.0.3 dev lan0"), "{}", kernel_route());
    ping_until(&t.b, "10.1.5.10", 10)?;
    ping(&r.h, "10.2.0.2", 3)?;
    let route_of = || -> serde_json::Value {
        serde_json::from_str(
            &ga.ctl(&["route", "get", "10.1.5.10", "--name", &ga.name, "--json"])
                .unwrap_or_default(),
        )
        .unwrap_or_default()
    };
    let got = route_of();
    assert_eq!(got["route"]["source"], "config", "{got}");
    let slow_before = slow_total(&ga);
    ping(&t.b, "10.1.5.10", 5)?;
    assert_eq!(
        slow_total(&ga),
        slow_before,
        "pings through the router took the slow path"
    );

    // Reload to ECMP over both routers: the kernel's route follows.
    std::fs::write(&ga.config, cfg("10.1.0.3 10.1.0.4"))?;
    let out = ga.ctl(&["reload", &ga.name])?;
    assert!(out.contains("default:10.1.5.0/24"), "{out}");
    let k = kernel_route();
    assert!(
        k.contains("nexthop via 10.1.0.3") && k.contains("nexthop via 10.1.0.4"),
        "{k}"
    );
    let got = route_of();
    assert_eq!(got["route"]["next_hops"].as_array().map(|a| a.len()), Some(2), "{got}");
    assert_eq!(got["route"]["source"], "config", "{got}");
    ping(&t.b, "10.1.5.10", 3)?;

    // A clean stop takes it out of the kernel again.
    let (status, log) = ga.stop();
    assert!(status.is_some_and(|s| s.success()), "{log}");
    assert!(kernel_route().trim().is_empty(), "left behind: {}", kernel_route());
    Ok(())
}
