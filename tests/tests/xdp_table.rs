//! The XDP program's classification, frame by frame: the real program with
//! its real maps (a running dataplane in a namespace), each frame of a table
//! run once with BPF_PROG_TEST_RUN, checked for the action and for the one
//! named counter it must move. End-to-end tests only see the sum of these
//! decisions; this sees each.

use anyhow::{Context, Result, bail};
use subway_dataplane::wire::{EtherType, MacAddr, ethernet, ipv4, ipv6, udp};
use subway_dataplane::{Dataplane, DataplaneConfig, LanConfig, PeerRoutes, XdpAttach, XskOptions};
use subway_testkit::{Netns, require_root, veth};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

fn mac_of(ifname: &str) -> Result<MacAddr> {
    let s = std::fs::read_to_string(format!("/sys/class/net/{ifname}/address"))?;
    let b: Vec<u8> = s
        .trim()
        .split(':')
        .map(|h| u8::from_str_radix(h, 16))
        .collect::<Result<_, _>>()?;
    Ok(MacAddr(b.try_into().map_err(|_| anyhow::anyhow!("bad MAC {s}"))?))
}

fn ifindex_of(ifname: &str) -> Result<u32> {
    Ok(std::fs::read_to_string(format!("/sys/class/net/{ifname}/ifindex"))?
        .trim()
        .parse()?)
}

/// Ethernet + IPv4 + UDP (+ payload) to `dst` on `mac`.
fn v4_udp(mac: MacAddr, src: [u8; 4], dst: [u8; 4], dport: u16, ttl: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 8 + payload.len()];
    ethernet::emit(&mut f, mac, MacAddr([2, 0, 0, 0, 0, 0xaa]), EtherType::IPV4);
    ipv4::emit(&mut f[14..], src.into(), dst.into(), 17, ttl, 8 + payload.len());
    udp::emit(&mut f[34..], 40000, dport, payload.len());
    f[42..].copy_from_slice(payload);
    f
}

const TEST: &str = "every_kind_of_frame_gets_its_action_and_its_named_counter";

#[test]
fn every_kind_of_frame_gets_its_action_and_its_named_counter() -> Result<()> {
    // The dataplane reads /sys and needs the namespace's own: the test
    // re-runs itself under `ip netns exec`, and that run does the table.
    if let Ok(name) = std::env::var("SUBWAY_XDP_TABLE_INSTANCE") {
        return table(&name);
    }
    if !require_root(TEST) {
        return Ok(());
    }
    let gw = Netns::new("gw")?;
    let host = Netns::new("h")?;
    let far = Netns::new("f")?;
    veth(&host, "eth0", &gw, "lan0")?;
    veth(&gw, "wan0", &far, "wan0")?;
    gw.sh(
        "ip addr add 10.1.0.1/24 dev lan0 && ip -6 addr add fd01::1/64 dev lan0 nodad && \
         ip addr add 192.0.2.1/24 dev wan0",
    )?;
    let exe = std::env::current_exe()?;
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &gw.name])
        .arg(&exe)
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env("SUBWAY_XDP_TABLE_INSTANCE", subway_testkit::unique("xt"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || !text.contains("1 passed") {
        bail!("the table run in {} failed:\n{text}", gw.name);
    }
    Ok(())
}

/// Inside the gateway's namespace: a dataplane, and the table.
fn table(name: &str) -> Result<()> {
    let (lan, wan) = (ifindex_of("lan0")?, ifindex_of("wan0")?);
    let (lan_mac, wan_mac) = (mac_of("lan0")?, mac_of("wan0")?);
    let cfg = DataplaneConfig {
        name: name.to_string(),
        lans: vec![LanConfig {
            ifname: "lan0".into(),
            subnets: Vec::new(),
            vnet: 0,
            routes: Vec::new(),
        }],
        queues: None,
        cores: None,
        xsk: XskOptions::default(),
        xdp_mode: XdpAttach::Driver,
        uplink: Some("wan0".into()),
        listen_port: 51820,
        source_ports: 1,
        policies: Vec::new(),
        flows: Default::default(),
        peers: vec![PeerRoutes {
            id: 0,
            vnet: 0,
            allowed_ips: vec!["10.2.0.0/24".parse()?, "fd02::/64".parse()?],
            priority: None,
            up: true,
        }],
        fail_open: true,
    };
    let mut dp = Dataplane::start(&cfg).context("starting the dataplane")?;
    let wg_data = {
        let mut m = vec![0u8; 32 + 16];
        m[0] = 4;
        m
    };
    let wg_init = {
        let mut m = vec![0u8; 148];
        m[0] = 1;
        m
    };
    let mut vlan = v4_udp(lan_mac, [10, 1, 0, 2], [10, 2, 0, 5], 9, 64, b"x");
    vlan.splice(12..12, [0x81, 0x00, 0x00, 0x07]);
    let mut v6 = vec![0u8; 14 + 40 + 8];
    ethernet::emit(&mut v6, lan_mac, MacAddr([2, 0, 0, 0, 0, 0xaa]), EtherType::IPV6);
    ipv6::emit(&mut v6[14..], "fd01::2".parse()?, "fd02::5".parse()?, 17, 64, 8);
    udp::emit(&mut v6[54..], 1, 2, 0);
    // An ARP reply to us, and an ARP request to everyone.
    let mut arp = vec![0u8; 42];
    ethernet::emit(&mut arp, lan_mac, MacAddr([2, 0, 0, 0, 0, 0xaa]), EtherType::ARP);
    let mut arp_bcast = arp.clone();
    arp_bcast[..6].copy_from_slice(&[0xff; 6]);
    let mut truncated = v4_udp(lan_mac, [10, 1, 0, 2], [10, 2, 0, 5], 9, 64, b"");
    truncated.truncate(14 + 10);
    let other_mac = v4_udp(MacAddr([2, 9, 9, 9, 9, 9]), [10, 1, 0, 2], [10, 2, 0, 5], 9, 64, b"x");
    let table: Vec<(&str, Vec<u8>, u32, u32, &str)> = vec![
        (
            "IPv4 to a peer's prefix",
            v4_udp(lan_mac, [10, 1, 0, 2], [10, 2, 0, 5], 9, 64, b"x"),
            lan,
            XDP_REDIRECT,
            "redirect_route",
        ),
        ("IPv6 to a peer's prefix", v6, lan, XDP_REDIRECT, "redirect_route"),
        ("VLAN-tagged", vlan, lan, XDP_PASS, "pass_vlan"),
        ("truncated IPv4 header", truncated, lan, XDP_PASS, "pass_malformed"),
        ("another host's MAC", other_mac, lan, XDP_PASS, "pass_not_for_us"),
        ("ARP to us", arp, lan, XDP_PASS, "pass_not_ip"),
        ("ARP broadcast", arp_bcast, lan, XDP_PASS, "pass_multicast"),
        (
            "the gateway's own address",
            v4_udp(lan_mac, [10, 1, 0, 2], [10, 1, 0, 1], 22, 64, b"x"),
            lan,
            XDP_PASS,
            "pass_local",
        ),
        (
            "multicast",
            v4_udp(lan_mac, [10, 1, 0, 2], [224, 0, 0, 251], 5353, 64, b"x"),
            lan,
            XDP_PASS,
            "pass_multicast",
        ),
        (
            "no steered prefix",
            v4_udp(lan_mac, [10, 1, 0, 2], [198, 51, 100, 7], 53, 64, b"x"),
            lan,
            XDP_PASS,
            "pass_no_route",
        ),
        (
            "TTL 1 to a peer's prefix",
            v4_udp(lan_mac, [10, 1, 0, 2], [10, 2, 0, 5], 9, 1, b"x"),
            lan,
            XDP_PASS,
            "pass_ttl_expired",
        ),
        (
            "WireGuard data to our port",
            v4_udp(wan_mac, [192, 0, 2, 2], [192, 0, 2, 1], 51820, 64, &wg_data),
            wan,
            XDP_REDIRECT,
            "redirect_listen",
        ),
        (
            "WireGuard initiation to our port",
            v4_udp(wan_mac, [192, 0, 2, 2], [192, 0, 2, 1], 51820, 64, &wg_init),
            wan,
            XDP_PASS,
            "pass_handshake",
        ),
        (
            "UDP 51820 to another address",
            v4_udp(wan_mac, [192, 0, 2, 2], [192, 0, 2, 9], 51820, 64, &wg_data),
            wan,
            XDP_PASS,
            "pass_no_route",
        ),
    ];
    let mut failures = Vec::new();
    for (what, frame, ifindex, want, counter) in table {
        let before: std::collections::HashMap<&str, u64> = dp.xdp_counters()?.into_iter().collect();
        let action = dp.xdp_test_run(&frame, ifindex).with_context(|| what.to_string())?;
        let after = dp.xdp_counters()?;
        let moved: Vec<&str> = after
            .iter()
            .filter(|(k, v)| *k != "seen" && *v != before[k])
            .map(|(k, _)| *k)
            .collect();
        if action != want || moved != vec![counter] {
            failures.push(format!(
                "{what}: action {action} (want {want}), counters moved {moved:?} (want [{counter}])"
            ));
        }
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }
    dp.stop_clean();
    Ok(())
}
