//! Routed mode, end to end: two subnets, one gateway namespace running
//! `subway run` with the real XDP program and AF_XDP sockets on veths.
//! Every test needs root; without it they say so and pass.

use anyhow::{Context, Result};
use std::time::Duration;
use subway_testkit::{Subway, TwoSubnets, ping, require_root, tcp_echo, workspace_bin, xdp_attached};

fn forwarded_by_kernel(t: &TwoSubnets) -> Result<u64> {
    // Ip: ForwDatagrams from /proc/net/snmp inside the gateway.
    let snmp = t.gw.run(&["cat", "/proc/net/snmp"])?;
    let mut lines = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (
        lines.next().context("snmp header")?,
        lines.next().context("snmp values")?,
    );
    let idx = names
        .split_whitespace()
        .position(|n| n == "ForwDatagrams")
        .context("ForwDatagrams")?;
    Ok(values.split_whitespace().nth(idx).context("value")?.parse()?)
}

#[test]
fn hosts_in_two_subnets_reach_each_other_through_the_af_xdp_path() -> Result<()> {
    if !require_root("hosts_in_two_subnets_reach_each_other_through_the_af_xdp_path") {
        return Ok(());
    }
    let t = TwoSubnets::new()?;
    let gw = Subway::start(&t.gw, &t.routed_config(""))?;

    // Warm up neighbours (the first packets may take the slow path).
    let diag = || {
        format!(
            "show: {}\nneighbours: {}\nlog:\n{}",
            gw.show().map(|v| v.to_string()).unwrap_or_default(),
            t.gw.run(&["ip", "-6", "neigh"]).unwrap_or_default(),
            gw.proc.log_text()
        )
    };
    // Warm-up only: the assertions follow. An IPv6 first packet is
    // sometimes lost while both sides' neighbour discovery settles.
    subway_testkit::ping_until(&t.a, "10.2.0.2", 5).with_context(diag)?;
    subway_testkit::ping_until(&t.a, "fd02::2", 5).with_context(diag)?;
    ping(&t.a, "fd02::2", 2).with_context(diag)?;
    std::thread::sleep(Duration::from_millis(300));
    let kernel_before = forwarded_by_kernel(&t)?;
    let before = gw.show()?;

    ping(&t.a, "10.2.0.2", 20)?;
    ping(&t.b, "10.1.0.2", 20)?;
    ping(&t.a, "fd02::2", 20)?;
    ping(&t.b, "fd01::2", 20)?;
    // TCP both ways; the server sees the client's own address (no NAT).
    let seen = tcp_echo(&t.a, &t.b, "10.2.0.2:5001".parse()?, 256 * 1024)?;
    assert_eq!(seen.ip().to_string(), "10.1.0.2");
    let seen = tcp_echo(&t.b, &t.a, "10.1.0.2:5002".parse()?, 256 * 1024)?;
    assert_eq!(seen.ip().to_string(), "10.2.0.2");
    let seen = tcp_echo(&t.a, &t.b, "[fd02::2]:5003".parse()?, 256 * 1024)?;
    assert_eq!(seen.ip().to_string(), "fd01::2");

    let after = gw.show()?;
    let d = |k: &str| after["totals"][k].as_u64().unwrap() - before["totals"][k].as_u64().unwrap();
    // 40 echo requests + 40 replies each family, plus the TCP segments.
    assert!(d("forwarded_v4") >= 80 + 100, "forwarded_v4 = {}", d("forwarded_v4"));
    assert!(d("forwarded_v6") >= 80 + 50, "forwarded_v6 = {}", d("forwarded_v6"));
    assert_eq!(
        d("tx_packets"),
        d("forwarded_v4") + d("forwarded_v6"),
        "every forwarded frame was sent"
    );
    assert_eq!(d("drop_tx_ring_full"), 0);
    let xdp_redirects =
        after["xdp"]["redirect_route"].as_u64().unwrap() - before["xdp"]["redirect_route"].as_u64().unwrap();
    assert!(
        xdp_redirects >= d("rx_packets"),
        "XDP redirected {xdp_redirects}, workers got {}",
        d("rx_packets")
    );
    // The kernel forwarded (almost) none of it.
    let kernel = forwarded_by_kernel(&t)? - kernel_before;
    assert!(
        kernel <= 4,
        "the kernel forwarded {kernel} datagrams that should have taken the fast path"
    );
    let w = &after["workers"][0];
    assert_eq!(w["mode"], "copy", "veth has no zero-copy: {w}");
    assert_eq!(w["queue"], 0);
    Ok(())
}

#[test]
fn the_gateway_itself_and_arp_ndp_stay_with_the_kernel() -> Result<()> {
    if !require_root("the_gateway_itself_and_arp_ndp_stay_with_the_kernel") {
        return Ok(());
    }
    let t = TwoSubnets::new()?;
    let gw = Subway::start(&t.gw, &t.routed_config(""))?;
    // 10.2.0.1 is inside the steered 10.2.0.0/24 but is the gateway's own.
    for dst in ["10.1.0.1", "10.2.0.1", "fd01::1", "fd02::1"] {
        ping(&t.a, dst, 3).with_context(|| format!("ping {dst}"))?;
    }
    let s = gw.show()?;
    assert!(s["xdp"]["pass_local"].as_u64().unwrap() >= 6, "{}", s["xdp"]);
    // ARP requests (broadcast) and NDP solicitations (multicast).
    let mcast = s["xdp"]["pass_multicast"].as_u64().unwrap();
    assert!(mcast >= 2, "ARP and NDP should pass to the kernel: {}", s["xdp"]);
    assert_eq!(s["xdp"]["redirect_route"], 0, "{}", s["xdp"]);
    assert_eq!(s["totals"]["forwarded_v4"], 0);
    Ok(())
}

#[test]
fn stopping_detaches_xdp_and_traffic_falls_back_to_the_kernel() -> Result<()> {
    if !require_root("stopping_detaches_xdp_and_traffic_falls_back_to_the_kernel") {
        return Ok(());
    }
    let t = TwoSubnets::new()?;
    let gw = Subway::start(&t.gw, &t.routed_config(""))?;
    ping(&t.a, "10.2.0.2", 3)?;
    assert!(xdp_attached(&t.gw, "lan0")? && xdp_attached(&t.gw, "lan1")?);
    let tun = gw.show()?["slow_path"].as_str().unwrap().to_string();
    let (status, log) = gw.stop();
    assert!(
        status.map(|s| s.success()).unwrap_or(false),
        "subway did not exit cleanly:\n{log}"
    );
    assert!(
        !xdp_attached(&t.gw, "lan0")? && !xdp_attached(&t.gw, "lan1")?,
        "XDP left behind"
    );
    assert!(
        !t.gw.run(&["ip", "link"])?.contains(&tun),
        "slow-path TUN {tun} left behind"
    );
    // The kernel forwards now.
    ping(&t.a, "10.2.0.2", 3)?;
    ping(&t.b, "fd01::2", 3)?;
    Ok(())
}

#[test]
fn a_killed_dataplane_fails_open_to_the_kernel() -> Result<()> {
    if !require_root("a_killed_dataplane_fails_open_to_the_kernel") {
        return Ok(());
    }
    let t = TwoSubnets::new()?;
    let gw = Subway::start(&t.gw, &t.routed_config(""))?;
    ping(&t.a, "10.2.0.2", 2)?;
    // SAFETY: SIGKILL to the subway process this test started, by its pid.
    unsafe { libc::kill(gw.proc.pid() as i32, libc::SIGKILL) };
    subway_testkit::wait_until("XDP detached after the crash", Duration::from_secs(5), || {
        Ok(!xdp_attached(&t.gw, "lan0")?)
    })?;
    ping(&t.a, "10.2.0.2", 3).context("traffic must flow through the kernel after a crash")?;
    assert!(
        !xdp_attached(&t.gw, "lan0")?,
        "the kernel should drop a dead process's XDP link"
    );
    Ok(())
}

/// Sends raw Ethernet frames out of `ifname` in the current namespace.
fn send_raw(ifname: &str, frames: &[Vec<u8>]) -> Result<()> {
    let c = std::ffi::CString::new(ifname)?;
    // SAFETY: plain libc calls with valid arguments; fd closed below.
    unsafe {
        let ifindex = libc::if_nametoindex(c.as_ptr());
        anyhow::ensure!(ifindex != 0, "no interface {ifname}");
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        anyhow::ensure!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        for f in frames {
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = ifindex as i32;
            sll.sll_halen = 6;
            sll.sll_addr[..6].copy_from_slice(&f[..6]);
            let n = libc::sendto(
                fd,
                f.as_ptr().cast(),
                f.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            anyhow::ensure!(n == f.len() as isize, "sendto: {}", std::io::Error::last_os_error());
        }
        libc::close(fd);
    }
    Ok(())
}

#[test]
fn malformed_frames_are_counted_and_dropped_without_harming_the_worker() -> Result<()> {
    if !require_root("malformed_frames_are_counted_and_dropped_without_harming_the_worker") {
        return Ok(());
    }
    use subway_dataplane::wire::{EtherType, MacAddr, ethernet, ipv4, ipv6, udp};
    let t = TwoSubnets::new()?;
    let gw = Subway::start(&t.gw, &t.routed_config(""))?;
    ping(&t.a, "10.2.0.2", 2)?;
    let gw_mac: MacAddr =
        t.gw.run(&["cat", "/sys/class/net/lan0/address"])?
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("mac"))?;
    let a_mac: MacAddr =
        t.a.run(&["cat", "/sys/class/net/eth0/address"])?
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("mac"))?;
    let good_v4 = || {
        let mut f = vec![0u8; 14 + 20 + 8 + 32];
        ethernet::emit(&mut f, gw_mac, a_mac, EtherType::IPV4);
        ipv4::emit(
            &mut f[14..],
            "10.1.0.2".parse().unwrap(),
            "10.2.0.2".parse().unwrap(),
            17,
            64,
            40,
        );
        udp::emit(&mut f[34..], 9, 9, 32);
        f
    };
    let before = gw.show()?;
    let mut frames = Vec::new();
    // Total length past the end of the frame: the worker drops it.
    let mut f = good_v4();
    f[16..18].copy_from_slice(&1400u16.to_be_bytes());
    frames.push(f);
    // Bad header checksum: the worker drops it.
    let mut f = good_v4();
    f[24] ^= 0x55;
    frames.push(f);
    // IHL 3: the XDP program leaves it to the kernel (which drops it).
    let mut f = good_v4();
    f[14] = 0x43;
    frames.push(f);
    // Truncated IPv4 header.
    let mut f = good_v4();
    f.truncate(14 + 10);
    frames.push(f);
    // IPv6 payload length past the end of the frame.
    let mut f = vec![0u8; 14 + 40 + 8];
    ethernet::emit(&mut f, gw_mac, a_mac, EtherType::IPV6);
    ipv6::emit(
        &mut f[14..],
        "fd01::2".parse().unwrap(),
        "fd02::2".parse().unwrap(),
        17,
        64,
        500,
    );
    frames.push(f);
    let batch: Vec<Vec<u8>> = (0..10).flat_map(|_| frames.clone()).collect();
    t.a.enter(|| send_raw("eth0", &batch))??;
    // Until the last of them is counted (then the exact counts below).
    let seen = before["xdp"]["seen"].as_u64().unwrap();
    subway_testkit::wait_until("the malformed frames counted", Duration::from_secs(5), || {
        Ok(gw.show()?["xdp"]["seen"].as_u64().unwrap() >= seen + batch.len() as u64)
    })?;
    std::thread::sleep(Duration::from_millis(50));

    let after = gw.show()?;
    let d = |sec: &str, k: &str| after[sec][k].as_u64().unwrap() - before[sec][k].as_u64().unwrap();
    assert_eq!(d("totals", "drop_ipv4_malformed"), 10, "{}", after["totals"]);
    assert_eq!(d("totals", "drop_ipv4_bad_checksum"), 10, "{}", after["totals"]);
    assert_eq!(d("totals", "drop_ipv6_malformed"), 10, "{}", after["totals"]);
    assert_eq!(d("xdp", "pass_malformed"), 20, "{}", after["xdp"]);
    // The worker is unharmed.
    ping(&t.a, "10.2.0.2", 5)?;
    ping(&t.b, "fd01::2", 5)?;
    assert!(gw.total("forwarded_v4")? > after["totals"]["forwarded_v4"].as_u64().unwrap());
    Ok(())
}

#[test]
fn a_failed_start_leaves_no_xdp_program_or_tun_behind() -> Result<()> {
    if !require_root("a_failed_start_leaves_no_xdp_program_or_tun_behind") {
        return Ok(());
    }
    let t = TwoSubnets::new()?;
    // veth has one RX queue: binding to queue 7 fails after XDP is loaded.
    let err = Subway::start(&t.gw, &t.routed_config("Queues = 7"))
        .err()
        .context("start should fail")?;
    let msg = format!("{err:#}");
    assert!(msg.contains("queue 7"), "the error should name the queue: {msg}");
    assert!(!xdp_attached(&t.gw, "lan0")? && !xdp_attached(&t.gw, "lan1")?);
    assert!(!t.gw.run(&["ip", "link"])?.contains("sw-"), "TUN left behind");
    // Routed mode has nothing to fence: no table to leave behind either.
    assert!(
        !t.gw.run(&["nft", "list", "tables"])?.contains("subway_"),
        "an empty fail-safe table left behind"
    );
    ping(&t.a, "10.2.0.2", 2)?;

    // Now fail after XDP is attached to lan0: a bridge has no native XDP,
    // so attaching in driver mode to the second interface fails.
    t.gw.sh("ip link add br0 type bridge && ip link set br0 up && ip addr add 10.3.0.1/24 dev br0")?;
    let cfg = "[Lan]\nInterface = lan0\n[Lan]\nInterface = br0\n[Tuning]\nXdpMode = driver\n";
    let err = Subway::start(&t.gw, cfg).err().context("start should fail")?;
    let msg = format!("{err:#}");
    assert!(msg.contains("attaching XDP to br0"), "{msg}");
    assert!(
        !xdp_attached(&t.gw, "lan0")?,
        "lan0 keeps an XDP program after a failed start"
    );
    assert!(!t.gw.run(&["ip", "link"])?.contains("sw-"), "TUN left behind");
    ping(&t.a, "10.2.0.2", 2)?;
    Ok(())
}

#[test]
fn check_and_help_speak_to_the_user() -> Result<()> {
    let bin = workspace_bin("subway")?;
    let dir = subway_testkit::work_dir();
    let bad = dir.join(format!("{}.conf", subway_testkit::unique("bad")));
    std::fs::write(&bad, "[Lan]\nInterface = lan0\nSubnet = 10.0.0.0/24\n")?;
    let out = std::process::Command::new(&bin)
        .args(["check", "--config", bad.to_str().unwrap()])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:3: unknown key `Subnet` in [Lan]", bad.display())),
        "{err}"
    );
    // lo exists but is not Ethernet.
    let lo = dir.join(format!("{}.conf", subway_testkit::unique("lo")));
    std::fs::write(&lo, "[Lan]\nInterface = lo\n")?;
    let out = std::process::Command::new(&bin)
        .args(["check", "--config", lo.to_str().unwrap()])
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(":1: interface lo is not Ethernet"));
    for sub in ["run", "check", "show"] {
        let out = std::process::Command::new(&bin).args([sub, "--help"]).output()?;
        assert!(out.status.success());
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("--log-level") && help.contains("Usage: subway"), "{help}");
    }
    if require_root("check_and_help_speak_to_the_user (valid config)") {
        let t = TwoSubnets::new()?;
        let good = dir.join(format!("{}.conf", subway_testkit::unique("good")));
        std::fs::write(&good, t.routed_config("Queues = 0\nCores = 0"))?;
        let out =
            t.gw.output(&[bin.to_str().unwrap(), "check", "--config", good.to_str().unwrap()])?;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains(": ok (2 LAN interface(s), 0 peer(s)"));
    }
    Ok(())
}
