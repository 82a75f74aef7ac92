//! The parser's tests: whole files in, a config or an error naming the
//! line and the fix out.

use super::{Config, ConfigError};
use std::path::Path;
use subway_dataplane::{BindMode, XdpAttach};

const KEY_A: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
const KEY_B: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
const KEY_C: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("/etc/subway/site-a.conf"), text)
}

#[test]
fn a_full_gateway_config() {
    let c = parse(&format!(
        "# site A\n[Interface]\nPrivateKey = {KEY_A}\nListenPort = 51820\nUplink = wan0\nAddress = 10.9.0.1/24\n\n\
         [Lan]\nInterface = lan0\nSubnets = 10.1.0.0/24, fd01::/64\n\n\
         [Peer]\nPublicKey = {KEY_B}\nEndpoint = 192.0.2.2:51820\nAllowedIPs = 10.2.0.0/24\nAllowedIPs = fd02::/64\nPersistentKeepalive = 25\n\n\
         [Tuning]\nQueues = 0-1\nCores = 0,1\nBatchSize = 32\nXskMode = copy\nXdpMode = generic\nBusyPoll = on\n"
    ))
    .unwrap();
    assert_eq!(c.name, "site-a");
    assert_eq!(c.interface.listen_port, Some(51820));
    assert_eq!(c.interface.uplink.as_ref().unwrap().0, "wan0");
    assert_eq!(c.lans[0].subnets.len(), 2);
    assert_eq!(c.peers[0].allowed_ips.len(), 2);
    assert_eq!(c.peers[0].persistent_keepalive, Some(25));
    assert_eq!(c.tuning.queues, Some(vec![0, 1]));
    assert_eq!(c.tuning.xsk.batch_size, 32);
    assert_eq!(c.tuning.xsk.bind, BindMode::Copy);
    assert_eq!(c.tuning.xdp_mode, XdpAttach::Generic);
    assert!(c.tuning.xsk.busy_poll);
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(c.warnings[0].contains(":6: Address"), "{:?}", c.warnings);
}

#[test]
fn the_shipped_example_parses_once_keys_are_filled_in() {
    let text = include_str!("../../dist/example.conf")
        .replace("REPLACE_WITH_wg_genkey_OUTPUT", KEY_A)
        .replace("REPLACE_WITH_THE_OTHER_SITE_PUBLIC_KEY", KEY_B);
    let c = parse(&text).unwrap();
    assert_eq!(c.peers.len(), 1);
    assert_eq!(c.metrics.map(|m| m.0.to_string()), Some("127.0.0.1:9586".into()));
    assert_eq!(c.tuning.cores, Some(vec![2, 3]));
}

#[test]
fn routed_mode_needs_only_lans() {
    let c = parse("[Lan]\nInterface = lan0\n[Lan]\ninterface = lan1\nsubnets = 10.2.0.0/24\n").unwrap();
    assert_eq!(c.lans.len(), 2);
    assert!(c.peers.is_empty());
    assert!(c.lans[0].subnets.is_empty());
}

/// Deterministic mutation fuzzing of the parser (fixed seed and
/// rounds): whatever the file holds, `parse` returns a config or an
/// error naming a line of the file, and never panics.
#[test]
fn fuzz_the_config_parser() {
    let seed = include_str!("../../dist/example.conf")
        .replace("REPLACE_WITH_wg_genkey_OUTPUT", KEY_A)
        .replace("REPLACE_WITH_THE_OTHER_SITE_PUBLIC_KEY", KEY_B)
        + "\n[Peer]\nPublicKey = "
        + KEY_A
        + "\nAllowedIPs = 10.9.0.0/16, fd09::/48\nVNet = red\n\n[Lan]\nInterface = lan1\nVNet = red\nSubnets = 192.168.1.0/24\n";
    let pieces = [
        "[Peer]",
        "[Lan]",
        "[Interface]",
        "[Tuning]",
        "[Metrics]",
        "=",
        " = ",
        "\n",
        ",",
        "/",
        "/33",
        "/129",
        "0.0.0.0/0",
        "::/0",
        "VNet = ",
        "Queues = 0-3",
        "Cores = 9999999999",
        "FailMode = ",
        "\u{0}",
        "é",
        "#",
        "AllowedIPs = ",
        "Endpoint = [::1]:0",
        "ListenPort = 70000",
        "BatchSize = 0",
        "RingSize = 3",
    ];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as usize
    };
    let lines = seed.lines().count() + 64;
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..10_000 {
        let mut t: Vec<char> = seed.chars().collect();
        for _ in 0..1 + rnd(4) {
            let at = rnd(t.len() + 1);
            match rnd(4) {
                0 if at < t.len() => {
                    t.remove(at);
                }
                1 => t.splice(at..at, pieces[rnd(pieces.len())].chars()).for_each(drop),
                2 if at < t.len() => t.truncate(at),
                _ => t.insert(at.min(t.len()), char::from(32 + rnd(95) as u8)),
            }
        }
        let text: String = t.into_iter().collect();
        match parse(&text) {
            Ok(_) => ok += 1,
            Err(e) => {
                refused += 1;
                assert!(e.line <= lines, "{e}");
                assert!(e.to_string().starts_with("/etc/subway/site-a.conf"), "{e}");
            }
        }
    }
    assert!(ok > 50 && refused > 50, "{ok} parsed, {refused} refused");
}

#[test]
fn fail_mode_is_closed_unless_open_is_asked_for() {
    let base = "[Interface]\nListenPort = 51820\n{}\n[Lan]\nInterface = lan0\n";
    assert!(!parse(&base.replace("{}", "")).unwrap().interface.fail_open);
    assert!(
        !parse(&base.replace("{}", "FailMode = Closed"))
            .unwrap()
            .interface
            .fail_open
    );
    assert!(
        parse(&base.replace("{}", "failmode = open"))
            .unwrap()
            .interface
            .fail_open
    );
    expect_err(
        &base.replace("{}", "FailMode = ajar"),
        3,
        "FailMode = ajar: expected `closed`",
    );
}

fn expect_err(text: &str, line: usize, needle: &str) {
    let e = parse(text).unwrap_err();
    assert_eq!(e.line, line, "{e}");
    assert!(e.to_string().contains(needle), "{e}");
    assert!(e.to_string().starts_with("/etc/subway/site-a.conf:"), "{e}");
}

#[test]
fn errors_name_the_line_and_the_fix() {
    expect_err(
        "[Lan]\nInterface = lan0\nColour = blue\n",
        3,
        "unknown key `Colour` in [Lan]",
    );
    expect_err("[Lan]\nInterface = lan0\n[Bogus]\n", 3, "unknown section [Bogus]");
    expect_err(
        "[Interface]\nPrivateKey = notbase64!\n[Lan]\nInterface = lan0\n",
        2,
        "not valid base64",
    );
    expect_err(
        "[Interface]\nPrivateKey = AAAA\n[Lan]\nInterface = lan0\n",
        2,
        "3 bytes",
    );
    expect_err("[Lan]\nInterface = lan0\nSubnets = 10.0.0.0/33\n", 3, "not a prefix");
    expect_err("[Lan]\nSubnets = 10.0.0.0/24\n", 1, "has no Interface");
    expect_err("Interface = lan0\n", 1, "outside any section");
    expect_err("[Lan]\nInterface lan0\n", 2, "expected `Key = Value`");
    expect_err(
        "[Tuning]\nRingSize = 1000\n[Lan]\nInterface = lan0\n",
        2,
        "power of two",
    );
    expect_err(
        "[Tuning]\nXskMode = turbo\n[Lan]\nInterface = lan0\n",
        2,
        "auto, copy or zero-copy",
    );
    expect_err("[Interface]\nListenPort = 51820\n", 0, "no [Lan] section");
    expect_err(
        "[Lan]\nInterface = lan0\n[Lan]\nInterface = lan0\n",
        3,
        "already a [Lan] at line 1",
    );
    expect_err(
        "[Lan]\nInterface = lan0\nInterface = lan1\n",
        3,
        "given twice in this section (first at line 2)",
    );
    expect_err(
        "[Tuning]\nRingSize = 1000\nBatchSize = 32\n[Lan]\nInterface = lan0\n",
        2,
        "power of two",
    );
    expect_err(
        "[Tuning]\nBatchSize = 32\nRingSize = 16\n[Lan]\nInterface = lan0\n",
        3,
        "power of two",
    );
    expect_err("[Tuning]\nQueues = 0,0\n[Lan]\nInterface = lan0\n", 2, "twice");
    expect_err(
        "[Tuning]\nQueues = 64\n[Lan]\nInterface = lan0\n",
        2,
        "beyond the highest queue",
    );
    expect_err("[Tuning]\nSourcePorts = 0\n[Lan]\nInterface = lan0\n", 2, "use 1 to 32");
    expect_err(
        "[Tuning]\nSourcePorts = 33\n[Lan]\nInterface = lan0\n",
        2,
        "use 1 to 32",
    );
    expect_err(
        "[Interface]\n[Tuning]\nSourcePorts = 4\n[Lan]\nInterface = lan0\n",
        3,
        "needs a fixed ListenPort",
    );
    expect_err(
        "[Interface]\nListenPort = 65534\n[Tuning]\nSourcePorts = 4\n[Lan]\nInterface = lan0\n",
        4,
        "past port 65535",
    );
    let c = parse("[Interface]\nListenPort = 65532\n[Tuning]\nSourcePorts = 4\n[Lan]\nInterface = lan0\n").unwrap();
    assert_eq!(c.tuning.source_ports.map(|s| (s.0, s.1)), Some((4, 4)));
    // Moved down a line, it is the same setting (no restart on reload).
    let moved =
        parse("[Interface]\nListenPort = 65532\n\n[Tuning]\nSourcePorts = 4\n[Lan]\nInterface = lan0\n").unwrap();
    assert_eq!(moved.tuning, c.tuning);
    assert_eq!(moved.tuning.source_ports.map(|s| s.1), Some(5));
}

#[test]
fn a_prefix_claimed_by_two_peers_is_refused() {
    let text = format!(
        "[Interface]\nPrivateKey = {KEY_A}\nUplink = wan0\n[Lan]\nInterface = lan0\n\
         [Peer]\nPublicKey = {KEY_B}\nAllowedIPs = 10.2.0.0/24\n\
         [Peer]\nPublicKey = {KEY_C}\nAllowedIPs = 10.3.0.0/24, 10.2.0.0/24\n"
    );
    expect_err(&text, 11, "already claimed at line 8");
    // The same prefix in another VNET is fine.
    let ok = text.replace(
        "AllowedIPs = 10.3.0.0/24, 10.2.0.0/24",
        "AllowedIPs = 10.2.0.0/24\nVNet = blue",
    );
    parse(&ok).unwrap();
    // A LAN's subnet is an owner too.
    let lan = text.replace("Interface = lan0\n", "Interface = lan0\nSubnets = 10.3.0.0/24\n");
    expect_err(&lan, 12, "10.3.0.0/24 in VNET default is already claimed at line 4");
}

#[test]
fn peers_need_a_private_key_and_unique_public_keys() {
    expect_err(
        &format!("[Interface]\nUplink = wan0\n[Lan]\nInterface = lan0\n[Peer]\nPublicKey = {KEY_B}\n"),
        1,
        "no PrivateKey",
    );
    expect_err(
        &format!("[Lan]\nInterface = lan0\n[Peer]\nPublicKey = {KEY_B}\n"),
        0,
        "no Uplink",
    );
    expect_err(
        &format!(
            "[Interface]\nPrivateKey = {KEY_A}\nUplink = wan0\n[Lan]\nInterface = lan0\n[Peer]\nPublicKey = {KEY_B}\n[Peer]\nPublicKey = {KEY_B}\n"
        ),
        8,
        "already the [Peer] at line 6",
    );
}

#[test]
fn missing_interfaces_are_named() {
    let c = parse("[Lan]\nInterface = nosuchif0\n").unwrap();
    let e = c.check_interfaces().unwrap_err();
    assert_eq!(e.line, 1);
    assert!(e.msg.contains("nosuchif0 does not exist"), "{e}");
}

#[test]
fn vnet_ids_are_dense_with_default_first() {
    let c =
        parse("[Lan]\nInterface = a\nVNet = red\n[Lan]\nInterface = b\n[Lan]\nInterface = c\nVNet = blue\n").unwrap();
    assert_eq!(c.vnet_ids(), vec!["default", "red", "blue"]);
}

#[test]
fn routes_through_lan_routers_are_parsed_and_refused_with_line_and_fix() {
    let base = |route: &str, vnet: &str| {
        format!(
            "[Interface]\nPrivateKey = {KEY_A}\nListenPort = 51820\nUplink = wan0\n\n\
             [Lan]\nInterface = lan0\nSubnets = 10.1.0.0/24, fd01::/64\nVNet = {vnet}\n{route}\n\n\
             [Peer]\nPublicKey = {KEY_B}\nEndpoint = 192.0.2.2:51820\nAllowedIPs = 10.2.0.0/24\nVNet = {vnet}\n"
        )
    };
    let c = parse(&base(
        "Route = 10.1.5.0/24 via 10.1.0.254\nRoute = 10.1.6.0/24 via 10.1.0.253, 10.1.0.254\nRoute = fd05::/64 via fd01::fe",
        "red",
    ))
    .unwrap();
    let r = &c.lans[0].routes;
    assert_eq!(r.len(), 3);
    assert_eq!(r[1].1.len(), 2, "two routers: ECMP");
    assert_eq!((r[0].2, r[2].0.to_string()), (10, "fd05::/64".to_string()));
    // The default VNET takes them too (subway adds them to the kernel).
    let d = parse(&base("Route = 10.1.5.0/24 via 10.1.0.254", "default")).unwrap();
    assert_eq!(d.lans[0].routes.len(), 1);
    for (route, vnet, line, want) in [
        ("Route = 10.1.5.0/24 via 10.9.0.1", "red", 10, "not on lan0's Subnets"),
        (
            "Route = 10.2.0.0/25 via 10.1.0.254",
            "red",
            10,
            "overlaps the AllowedIPs of the [Peer] at line 12",
        ),
        (
            "Route = 10.2.0.0/25 via 10.1.0.254",
            "default",
            10,
            "overlaps the AllowedIPs of the [Peer] at line 12",
        ),
        ("Route = 10.1.5.0/24 10.1.0.254", "red", 10, "Route = PREFIX via ROUTER"),
        (
            "Route = 10.1.5.0/24 via fd01::fe",
            "red",
            10,
            "not of the prefix's IP version",
        ),
        (
            "Route = 10.1.0.0/24 via 10.1.0.254",
            "red",
            10,
            "already claimed at line 6",
        ),
    ] {
        let e = parse(&base(route, vnet)).unwrap_err().to_string();
        assert!(
            e.contains(&format!("site-a.conf:{line}:")) && e.contains(want),
            "{route}: {e}"
        );
    }
}

#[test]
fn the_ha_section_names_the_virtual_addresses_and_bad_ones_are_refused_with_line_and_fix() {
    let base = |ha: &str| {
        format!(
            "[Interface]\nPrivateKey = {KEY_A}\nListenPort = 51820\nUplink = wan0\n\n[Lan]\nInterface = lan0\n\n{ha}\n\
             [Peer]\nPublicKey = {KEY_B}\nEndpoint = 192.0.2.2:51820\nAllowedIPs = 10.2.0.0/24\n"
        )
    };
    let c = parse(&base("[HA]\nVirtualAddress = 10.1.0.1/24, fd01::1")).unwrap();
    let ha = c.ha.expect("an [HA] section");
    assert_eq!(ha.line, 9);
    assert_eq!(
        ha.virtual_addresses,
        vec![
            "10.1.0.1".parse::<std::net::IpAddr>().unwrap(),
            "fd01::1".parse().unwrap()
        ]
    );
    assert!(parse(&base("")).unwrap().ha.is_none());
    for (ha, line, want) in [
        ("[HA]\nVirtualAddress = 10.1.0", 10, "not an IP address"),
        ("[HA]\nVirtualAddress = 10.1.0.1, 10.1.0.1", 10, "listed twice"),
        ("[HA]\n", 9, "without a VirtualAddress"),
        ("[HA]\nPriority = 100", 10, "unknown key `Priority` in [HA]"),
        (
            "[HA]\nVirtualAddress = 10.1.0.1\n[HA]\nVirtualAddress = 10.1.0.2",
            11,
            "a second [HA]",
        ),
    ] {
        let e = parse(&base(ha)).unwrap_err().to_string();
        assert!(
            e.contains(&format!("site-a.conf:{line}:")) && e.contains(want),
            "{ha}: {e}"
        );
    }
}

#[test]
fn route_groups_are_parsed_and_ones_that_cannot_work_are_refused_with_line_and_fix() {
    // Two far gateways with keys of their own, as wg-quick peers with a
    // Priority and a Probe each.
    let two = |a: &str, b: &str| {
        format!(
            "[Interface]\nPrivateKey = {KEY_A}\nListenPort = 51820\nUplink = wan0\n\n[Lan]\nInterface = lan0\n\n\
             [Peer]\nPublicKey = {KEY_B}\nAllowedIPs = 10.2.0.0/24\n{a}\n\n\
             [Peer]\nPublicKey = {KEY_C}\nAllowedIPs = 10.2.0.0/24\n{b}\n"
        )
    };
    let ok = two(
        "Priority = 200\nProbe = 10.2.0.11\nProbeInterval = 100ms\nProbeMisses = 3",
        "Priority = 100\nProbe = 10.2.0.12",
    );
    let c = parse(&ok).unwrap();
    let g = c.peers[0].group.as_ref().unwrap();
    assert_eq!(
        (g.priority, g.probe_interval.as_millis(), g.probe_misses),
        (200, 100, 3)
    );
    let g = c.peers[1].group.as_ref().unwrap();
    assert_eq!(
        (g.priority, g.probe_interval, g.probe_misses),
        (100, super::PROBE_INTERVAL, super::PROBE_MISSES)
    );
    assert_eq!(g.probe.map(|p| p.0.to_string()), Some("10.2.0.12".into()));
    for (text, line, want) in [
        // The same prefix on two peers without priorities: one owner.
        (two("", ""), 16, "make the peers a route group"),
        // A member without a probe target.
        (
            two("Priority = 100", "Priority = 100\nProbe = 10.2.0.12"),
            9,
            "needs `Probe = ADDRESS`",
        ),
        // A probe target the peer's answers cannot come from.
        (
            two("Priority = 1\nProbe = 10.9.0.1", "Priority = 1\nProbe = 10.2.0.12"),
            13,
            "not in this peer's AllowedIPs",
        ),
        // Probing without a group.
        (
            two("Probe = 10.2.0.11", "Priority = 1\nProbe = 10.2.0.12"),
            12,
            "give this peer a Priority",
        ),
        // A priority on a peer that shares nothing (mixed VNETs).
        (
            two(
                "Priority = 1\nProbe = 10.2.0.11\nVNet = blue",
                "Priority = 1\nProbe = 10.2.0.12",
            ),
            12,
            "shares no prefix",
        ),
        (two("Priority = 300", ""), 12, "Priority"),
        (
            two("Priority = 1\nProbeInterval = 5", ""),
            13,
            "between 10 and 60000 ms",
        ),
    ] {
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains(&format!("site-a.conf:{line}:")) && e.contains(want),
            "{text}\n=> {e}"
        );
    }
    // Non-default VNETs cannot have one yet, said plainly.
    let red = two(
        "Priority = 1\nProbe = 10.2.0.11\nVNet = red",
        "Priority = 1\nProbe = 10.2.0.12\nVNet = red",
    );
    let e = parse(&red).unwrap_err().to_string();
    assert!(e.contains("for the default VNET today"), "{e}");
}

#[test]
fn the_export_section_names_a_table_of_its_own_and_bad_values_are_refused_with_line_and_fix() {
    let base = |e: &str| {
        format!(
            "[Interface]\nPrivateKey = {KEY_A}\nListenPort = 51820\nUplink = wan0\n\n[Lan]\nInterface = lan0\n\n{e}\n\
             [Peer]\nPublicKey = {KEY_B}\nEndpoint = 192.0.2.2:51820\nAllowedIPs = 10.2.0.0/24\n"
        )
    };
    let c = parse(&base("[Export]\nTable = 100\nDrainSeconds = 5")).unwrap();
    let e = c.export.expect("an [Export] section");
    assert_eq!((e.table, e.protocol, e.drain.as_secs()), (100, 250, 5));
    for (text, line, want) in [
        ("[Export]\n", 9, "without a Table"),
        ("[Export]\nTable = 254", 10, "254 (main)"),
        ("[Export]\nTable = 100\nProtocol = 2", 11, "the kernel's"),
        ("[Export]\nTable = 100\nBgp = yes", 11, "unknown key `Bgp` in [Export]"),
        ("[Export]\nTable = 100\n[Export]\nTable = 101", 11, "a second [Export]"),
    ] {
        let e = parse(&base(text)).unwrap_err().to_string();
        assert!(
            e.contains(&format!("site-a.conf:{line}:")) && e.contains(want),
            "{text}\n=> {e}"
        );
    }
}

#[test]
fn policies_are_parsed_checked_across_sections_and_bad_rules_are_refused_with_line_and_fix() {
    let base = format!(
        "[Interface]\nPrivateKey = {KEY_A}\nUplink = wan0\n\
         [Lan]\nInterface = lan0\nSubnets = 10.1.0.0/24, fd01::/64\n\
         [Peer]\nPublicKey = {KEY_B}\nAllowedIPs = 10.2.0.0/24, fd02::/64\n\
         [Policy]\nDefault = deny\n"
    );
    // Lines 10 and 11 are [Policy] and Default; rules start at line 12.
    let c = parse(&format!(
        "{base}Rule = allow in lan0 from 10.1.0.0/24 to 10.2.0.0/24 proto tcp port 443\n\
         Rule = allow in peer {KEY_B} proto icmpv6 to fd01::/64\n\
         Rule = deny proto udp port 5000-5999\n\
         Rule = allow in lan0 from 10.1.0.0/25 to 10.2.0.0/24 proto tcp port 443\n\
         Rule = allow to 192.168.0.0/16\n"
    ))
    .unwrap();
    let p = &c.policies[0];
    assert_eq!(p.vnet, "default");
    assert_eq!(p.default, subway_dataplane::policy::Action::Deny);
    assert_eq!(p.rules.len(), 5);
    assert_eq!(p.rules[0].ports, Some((443, 443)));
    assert_eq!(p.rules[2].ports, Some((5000, 5999)));
    assert_eq!(p.rules[1].line, 13);
    // Warnings: line 15 is shadowed by line 12; line 16 is outside the VNET.
    let w = c.warnings.join("\n");
    assert!(w.contains(":15: this rule never matches: the rule at line 12"), "{w}");
    assert!(
        w.contains(":16: `to 192.168.0.0/16` is outside VNET default's prefixes"),
        "{w}"
    );
    assert_eq!(c.warnings.len(), 2, "{w}");

    expect_err(
        &format!("{base}Rule = allow in peer {KEY_C}\n"),
        12,
        "no [Peer] has this PublicKey",
    );
    expect_err(
        &format!("{base}Rule = allow port 22\n"),
        12,
        "a port needs `proto tcp` or `proto udp`",
    );
    expect_err(
        &format!("{base}Rule = allow from 10.1.0.0/24 to fd02::/64\n"),
        12,
        "different families",
    );
    expect_err(
        &format!("{base}Rule = allow proto icmp to fd02::/64\n"),
        12,
        "write proto icmpv6",
    );
    expect_err(
        &format!("{base}Rule = allow in lan9\n"),
        12,
        "not a [Lan] of VNET default (lan0)",
    );
    expect_err(
        &format!("{base}Rule = permit proto tcp\n"),
        12,
        "must start with allow or deny",
    );
    expect_err(&format!("{base}Rule = allow proto sctp\n"), 12, "unknown protocol sctp");
    expect_err(
        &format!("{base}Rule = allow from 10.1.0.1/24\n"),
        12,
        "host bits set: write 10.1.0.0/24",
    );
    expect_err(&format!("{base}Rule = allow to\n"), 12, "`to` needs a value");
    expect_err(
        &format!("{base}Rule = allow port 9-3 proto tcp\n"),
        12,
        "expected a port or a range",
    );
    expect_err(&base.replace("deny", "maybe"), 11, "Default = maybe: use allow or deny");
    expect_err(
        &format!("{base}[Policy]\nVNet = default\n"),
        12,
        "a second [Policy] for VNET default",
    );
    expect_err(
        &format!("{base}VNet = blue\n"),
        10,
        "[Policy] for VNET blue, which no [Lan] or [Peer] has",
    );
    let c = parse(&format!("{base}[Tuning]\nMaxFlows = 100000\nFlowTimeoutUdp = 30\n")).unwrap();
    assert_eq!((c.tuning.flows.max_flows, c.tuning.flows.udp_secs), (100_000, 30));
    expect_err(
        &format!("{base}[Tuning]\nMaxFlows = 10\n"),
        13,
        "MaxFlows = 10: use 1024",
    );
}

#[test]
fn more_routes_than_the_xdp_tables_hold_are_refused_at_the_line_that_overflows() {
    let limit = subway_dataplane::MAX_ROUTES as usize;
    let mut text = format!(
        "[Interface]\nPrivateKey = {KEY_A}\nUplink = wan0\n[Lan]\nInterface = lan0\nSubnets = 10.1.0.0/24\n[Peer]\nPublicKey = {KEY_B}\n"
    );
    // lan0's subnet is route 1; the peer's /32s start at line 9.
    for i in 0..limit {
        let a = std::net::Ipv4Addr::from(0x0b00_0000u32 + i as u32);
        text += &format!("AllowedIPs = {a}/32\n");
    }
    let e = parse(&text).unwrap_err();
    assert_eq!(e.line, 8 + limit, "{e}");
    assert!(e.to_string().contains(&format!("route number {}", limit + 1)), "{e}");
    assert!(
        e.to_string().contains(&format!("hold {limit} routes per family")),
        "{e}"
    );
    // One fewer fits.
    let fits: String = text.lines().take(8 + limit - 1).map(|l| format!("{l}\n")).collect();
    assert!(parse(&fits).is_ok());
}

#[test]
fn a_reload_takes_unchanged_peer_sections_from_the_last_read_at_their_new_lines() {
    let path = Path::new("/etc/subway/site-a.conf");
    let head =
        format!("[Interface]\nPrivateKey = {KEY_A}\nListenPort = 51820\nUplink = wan0\n[Lan]\nInterface = lan0\n");
    let peer = |key: &str, nets: &str, extra: &str| {
        format!("\n[Peer]\n# a comment\nPublicKey = {key}\nEndpoint = 192.0.2.2:51820\nAllowedIPs = {nets}\n{extra}")
    };
    // B and C are a route group (10.2.0.0/24): their Priority and Probe
    // lines move too.
    let b = peer(
        KEY_B,
        "10.2.0.0/24, 10.12.0.0/24",
        "AllowedIPs = fd02::/64\nPriority = 1\nProbe = 10.2.0.1\n",
    );
    let c = peer(KEY_C, "10.3.0.0/24, 10.2.0.0/24", "Priority = 2\nProbe = 10.3.0.1");
    let first = Config::parse_with(path, format!("{head}{b}{c}"), None).unwrap();
    let texts = first.peer_texts.as_ref().unwrap();
    assert_eq!(texts.kept.len(), 2);
    // A new peer above both moves them down 6 lines; C's routes change;
    // the last section has no newline at the end of the file.
    let d = peer(&key(9), "10.4.0.0/24", "");
    let c2 = peer(KEY_C, "10.3.0.0/25, 10.2.0.0/24", "Priority = 2\nProbe = 10.3.0.1");
    let text = format!("{head}{d}{b}{c2}");
    // (Marked, to see which sections were taken rather than parsed.)
    let mut marked = first.clone();
    for p in &mut marked.peers {
        p.persistent_keepalive = Some(99);
    }
    let taken = Config::parse_with(path, text.clone(), Some(&marked)).unwrap();
    let ka: Vec<_> = taken.peers.iter().map(|p| p.persistent_keepalive).collect();
    assert_eq!(ka, [None, Some(99), None], "only B is unchanged");
    let second = Config::parse_with(path, text.clone(), Some(&first)).unwrap();
    let fresh = Config::parse(path, &text).unwrap();
    assert_eq!(second.peers, fresh.peers, "taken from the last read = parsed anew");
    assert_eq!(second.peers[1].line, first.peers[0].line + 6);
    // B was taken (it equals the last read's, moved), the others parsed;
    // all three are kept for the next reload.
    assert_eq!(second.peer_texts.as_ref().unwrap().kept.len(), 3);
    let third = Config::parse_with(path, text.clone(), Some(&second)).unwrap();
    assert_eq!(third.peers, fresh.peers);
    // An error in a changed section still names its line.
    let bad = format!("{head}{d}{b}{}", peer(KEY_C, "10.3.0.0/33", ""));
    let e = Config::parse_with(path, bad.clone(), Some(&second)).unwrap_err();
    assert_eq!(e, Config::parse(path, &bad).unwrap_err());
    // A section taken as it was is still checked against the others: B's
    // prefix listed again by D is refused, at the same line as without
    // the last read.
    let clash = format!("{head}{}{b}{c2}", peer(&key(9), "10.2.0.0/24", ""));
    let e = Config::parse_with(path, clash.clone(), Some(&second)).unwrap_err();
    assert_eq!(e, Config::parse(path, &clash).unwrap_err());
    // An Endpoint that is a name is resolved on every read: not kept.
    let named = format!(
        "{head}{}",
        peer(KEY_B, "10.2.0.0/24", "").replace("192.0.2.2", "localhost")
    );
    let cfg = Config::parse_with(path, named, None).unwrap();
    assert_eq!(cfg.peer_texts.as_ref().unwrap().kept.len(), 0);
}

/// A distinct valid key per byte.
fn key(b: u8) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode([b; 32])
}
