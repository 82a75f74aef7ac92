//! Live changes on a running gateway: `subway reload`, SIGHUP and `wg set`
//! change peers and routes while traffic flows through a peer that does
//! not change, and none of that traffic is lost.

use anyhow::{Context, Result};
use std::time::Duration;
use subway_testkit::{Subway, TwoSites, UdpFlow, host, ping, ping_until, require_root, wait_until, wg_keypair};

fn peer_keys(show: &serde_json::Value) -> Vec<String> {
    show["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["public_key"].as_str().unwrap().to_string())
        .collect()
}

fn has_route(show: &serde_json::Value, prefix: &str) -> bool {
    show["routes"].as_array().unwrap().iter().any(|r| r["prefix"] == prefix)
}

#[test]
fn reload_changes_peers_and_routes_without_losing_a_packet_of_an_unchanged_peer() -> Result<()> {
    if !require_root("reload_changes_peers_and_routes_without_losing_a_packet_of_an_unchanged_peer") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    let (c, d) = (wg_keypair()?, wg_keypair()?);
    let peer_c = format!(
        "\n[Peer]\nPublicKey = {}\nEndpoint = 192.0.2.77:51820\nAllowedIPs = 10.98.0.0/24\n",
        c.1
    );
    let ga = Subway::start(&t.gwa, &t.subway_config(true, false, &peer_c))?;
    let gb = Subway::start(&t.gwb, &t.subway_config(false, false, ""))?;
    ping_until(&t.a, "10.2.0.2", 10).with_context(|| ga.proc.log_text())?;
    let before = ga.show()?;
    assert_eq!(peer_keys(&before), vec![t.keys_b.1.clone(), c.1.clone()]);
    let b_handshakes = before["peers"][0]["handshakes"].as_u64().unwrap();

    // 4000 datagrams at 1000/s through peer B, which never changes.
    let flow = UdpFlow::start(&t.a, &t.b, "10.2.0.2:7000".parse()?, 4000, 1000, 200)?;
    std::thread::sleep(Duration::from_millis(600));

    // 1. `subway reload`: C removed, D added, a LAN subnet added.
    let peer_d = |nets: &str| {
        format!(
            "\n[Peer]\nPublicKey = {}\nEndpoint = 192.0.2.88:51820\nAllowedIPs = {nets}\n",
            d.1
        )
    };
    let v1 = t.subway_config(true, false, &peer_d("10.99.0.0/24")).replace(
        "[Lan]\nInterface = lan0\n",
        "[Lan]\nInterface = lan0\nSubnets = 10.1.0.0/24, 10.1.1.0/24\n",
    );
    std::fs::write(&ga.config, &v1)?;
    let out = ga.ctl(&["reload", &ga.name])?;
    assert!(out.contains("peers added: ") && out.contains(&d.1), "{out}");
    assert!(out.contains("peers removed: ") && out.contains(&c.1), "{out}");
    assert!(
        out.contains("default:10.1.1.0/24") && out.contains("default:10.98.0.0/24"),
        "{out}"
    );
    std::thread::sleep(Duration::from_millis(600));

    // 2. SIGHUP: D's routes change.
    std::fs::write(
        &ga.config,
        t.subway_config(true, false, &peer_d("10.99.0.0/24, 10.100.0.0/24")),
    )?;
    host(&["kill", "-HUP", &ga.proc.pid().to_string()])?;
    // The next step rewrites the file: the SIGHUP must have read it first.
    subway_testkit::wait_until("the SIGHUP reload", Duration::from_secs(5), || {
        Ok(ga.show()?["reloads"]["ok"].as_u64() == Some(2))
    })?;
    std::thread::sleep(Duration::from_millis(300));

    // 3. An invalid file changes nothing and says where and why.
    std::fs::write(
        &ga.config,
        format!("{}\n[Peer]\nPublicKey = not-a-key\n", t.subway_config(true, false, "")),
    )?;
    let bin = subway_testkit::workspace_bin("subway")?;
    let out = std::process::Command::new(&bin).args(["reload", &ga.name]).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an invalid reload succeeded");
    assert!(
        err.contains(&format!("{}:", ga.config.display())) && err.contains("PublicKey"),
        "{err}"
    );

    // 4. A file that parses but cannot be applied (a peer claims the LAN's
    // own prefix, which comes from lan0's address): refused by the
    // dataplane, nothing changed.
    let clash = t
        .subway_config(true, false, &peer_d("10.99.0.0/24, 10.100.0.0/24"))
        .replace("AllowedIPs = 10.2.0.0/24,", "AllowedIPs = 10.1.0.0/24, 10.2.0.0/24,");
    std::fs::write(&ga.config, &clash)?;
    let out = std::process::Command::new(&bin).args(["reload", &ga.name]).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("10.1.0.0/24"), "{err}");

    // 5. A change only a restart can make (the LAN moves to another VNET):
    // refused as such, with the file and line, nothing changed.
    let moved = t
        .subway_config(true, false, &peer_d("10.99.0.0/24, 10.100.0.0/24"))
        .replace("Interface = lan0\n", "Interface = lan0\nVNet = red\n");
    assert!(moved.contains("VNet = red"), "{moved}");
    std::fs::write(&ga.config, &moved)?;
    let out = std::process::Command::new(&bin).args(["reload", &ga.name]).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("need a restart") && err.contains(&format!("{}:", ga.config.display())),
        "{err}"
    );

    let r = flow.finish()?;
    assert_eq!(
        (r.received, r.lost, r.duplicates, r.reordered),
        (4000, 0, 0, 0),
        "{r:?}\n{}",
        ga.proc.log_text()
    );

    let after = ga.show()?;
    assert_eq!(peer_keys(&after), vec![t.keys_b.1.clone(), d.1.clone()]);
    assert_eq!(
        after["peers"][0]["handshakes"].as_u64().unwrap(),
        b_handshakes,
        "peer B's session was renegotiated"
    );
    for p in ["10.99.0.0/24", "10.100.0.0/24", "10.2.0.0/24"] {
        assert!(has_route(&after, p), "{p} missing: {}", after["routes"]);
    }
    assert!(!has_route(&after, "10.98.0.0/24"), "{}", after["routes"]);
    assert!(!has_route(&after, "10.1.1.0/24"), "{}", after["routes"]);
    assert_eq!(after["reloads"]["ok"], 2, "{}", after["reloads"]);
    assert_eq!(after["reloads"]["failed"], 3, "{}", after["reloads"]);
    // The kernel's routes follow: a removed peer's prefix no longer goes
    // to the tunnel, a new one does.
    assert!(t.gwa.run(&["ip", "route", "show", "10.98.0.0/24"])?.trim().is_empty());
    assert!(
        t.gwa
            .run(&["ip", "route", "show", "10.100.0.0/24"])?
            .contains("dev sw-")
    );
    ping(&t.a, "10.2.0.2", 5)?;
    drop(gb);
    Ok(())
}

#[test]
fn wg_set_changes_allowed_ips_and_peers_in_the_data_path() -> Result<()> {
    if !require_root("wg_set_changes_allowed_ips_and_peers_in_the_data_path") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    t.b.run(&["ip", "addr", "add", "10.2.0.200/24", "dev", "eth0"])?;
    // A knows only the lower half of B's subnet.
    let cfg_a = t
        .subway_config(true, false, "")
        .replace("AllowedIPs = 10.2.0.0/24", "AllowedIPs = 10.2.0.0/25");
    let ga = Subway::start(&t.gwa, &cfg_a)?;
    let _gb = Subway::start(&t.gwb, &t.subway_config(false, false, ""))?;
    ping_until(&t.a, "10.2.0.2", 10).with_context(|| ga.proc.log_text())?;
    let no =
        t.a.output(&["ping", "-c", "2", "-i", "0.2", "-W", "1", "-q", "10.2.0.200"])?;
    assert!(!no.status.success(), "10.2.0.200 is outside B's AllowedIPs");

    // `wg set`: B now also owns the upper half.
    host(&[
        "wg",
        "set",
        &ga.name,
        "peer",
        &t.keys_b.1,
        "allowed-ips",
        "10.2.0.0/25,10.2.0.128/25,fd02::/64",
    ])?;
    ping_until(&t.a, "10.2.0.200", 5).with_context(|| ga.proc.log_text())?;
    ping(&t.a, "10.2.0.200", 10)?;
    let s = ga.show()?;
    assert!(s["totals"]["tunnel_tx"].as_u64().unwrap() > 10, "{}", s["totals"]);
    let wg = host(&["wg", "show", &ga.name, "allowed-ips"])?;
    assert!(wg.contains("10.2.0.128/25"), "{wg}");

    // A new peer, then its removal.
    let e = wg_keypair()?;
    host(&[
        "wg",
        "set",
        &ga.name,
        "peer",
        &e.1,
        "endpoint",
        "192.0.2.50:51820",
        "allowed-ips",
        "10.50.0.0/24",
    ])?;
    let wg = host(&["wg", "show", &ga.name])?;
    assert!(
        wg.contains(&format!("peer: {}", e.1)) && wg.contains("192.0.2.50:51820"),
        "{wg}"
    );
    let got: serde_json::Value =
        serde_json::from_str(&ga.ctl(&["route", "get", "10.50.0.1", "--name", &ga.name, "--json"])?)?;
    assert_eq!(got["route"]["via"], e.1.as_str(), "{got}");
    assert!(t.gwa.run(&["ip", "route", "show", "10.50.0.0/24"])?.contains("dev sw-"));
    host(&["wg", "set", &ga.name, "peer", &e.1, "remove"])?;
    let wg = host(&["wg", "show", &ga.name])?;
    assert!(!wg.contains(&e.1), "{wg}");
    let got: serde_json::Value =
        serde_json::from_str(&ga.ctl(&["route", "get", "10.50.0.1", "--name", &ga.name, "--json"])?)?;
    assert!(got["route"].is_null(), "{got}");
    assert!(t.gwa.run(&["ip", "route", "show", "10.50.0.0/24"])?.trim().is_empty());

    // What needs a restart is refused, and changes nothing.
    let out = std::process::Command::new("wg")
        .args(["set", &ga.name, "listen-port", "1234"])
        .output()?;
    assert!(!out.status.success(), "a new listen port was accepted");
    ping(&t.a, "10.2.0.200", 3)?;
    let s = ga.show()?;
    assert_eq!(s["reloads"]["ok"], 3, "{}", s["reloads"]);
    Ok(())
}

/// Site A (subway) peers with two stock wireguard-go sites, B and C, on
/// one "internet" segment. Sessions are up with both before anything
/// changes, so that what the README promises is tried on live sessions: a
/// changed peer keeps its session (no new handshake, no loss), a removed
/// peer's session ends at once, and the real `wg syncconf` and `wg setconf`
/// (which send `remove=true` and `replace_peers=true`) do what they do on
/// a kernel WireGuard device.
#[test]
fn live_sessions_across_reload_syncconf_and_setconf() -> Result<()> {
    if !require_root("live_sessions_across_reload_syncconf_and_setconf") {
        return Ok(());
    }
    use subway_testkit::WgPeer;
    let sites = subway_testkit::SitesOnABridge::new(3)?;
    let (hosts, gws) = (&sites.hosts, &sites.gws);
    let (ka, kb, kc) = (wg_keypair()?, wg_keypair()?, wg_keypair()?);
    let _b = WgPeer::start(
        "wireguard-go",
        &gws[1],
        &kb.0,
        51820,
        &ka.1,
        "192.0.2.1:51820",
        &["10.1.0.0/24"],
    )?;
    let _c = WgPeer::start(
        "wireguard-go",
        &gws[2],
        &kc.0,
        51820,
        &ka.1,
        "192.0.2.1:51820",
        &["10.1.0.0/24"],
    )?;
    let peer = |k: &str, n: u8, nets: &str| {
        format!("\n[Peer]\nPublicKey = {k}\nEndpoint = 192.0.2.{n}:51820\nAllowedIPs = {nets}\n")
    };
    let head = format!(
        "[Interface]\nPrivateKey = {}\nListenPort = 51820\nUplink = wan0\n\n[Lan]\nInterface = lan0\n",
        ka.0
    );
    // Each handshake logged with who initiated it (for the assertions on
    // B's handshake count below).
    let ga = Subway::start_env(
        &gws[0],
        &(head.clone() + &peer(&kb.1, 2, "10.2.0.0/24") + &peer(&kc.1, 3, "10.3.0.0/24")),
        &[("RUST_LOG", "info,subway_dataplane::wg::device=debug")],
    )?;
    let (a, b, c) = (&hosts[0], &hosts[1], &hosts[2]);
    ping_until(a, "10.2.0.2", 10).with_context(|| ga.proc.log_text())?;
    ping_until(a, "10.3.0.2", 10).with_context(|| ga.proc.log_text())?;
    ping(c, "10.1.0.2", 3)?;
    let handshakes = |key: &str| -> Result<Option<u64>> {
        let s = ga.show()?;
        Ok(s["peers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["public_key"] == key)
            .and_then(|p| p["handshakes"].as_u64()))
    };
    let b0 = handshakes(&kb.1)?.context("B has no session")?;

    // 1. reload: B changed (a second prefix), C removed, with a flow to B.
    let flow = UdpFlow::start(a, b, "10.2.0.2:7501".parse()?, 1000, 500, 100)?;
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(&ga.config, head.clone() + &peer(&kb.1, 2, "10.2.0.0/24, 10.22.0.0/24"))?;
    let out = ga.ctl(&["reload", &ga.name])?;
    assert!(out.contains("peers removed: ") && out.contains(&kc.1), "{out}");
    let r = flow.finish()?;
    assert_eq!((r.received, r.lost), (1000, 0), "B's flow across the reload: {r:?}");
    assert_eq!(
        handshakes(&kb.1)?,
        Some(b0),
        "the changed peer B renegotiated\n{}",
        ga.proc.log_text()
    );
    // C's session is gone: its packets (on its old session) are refused.
    let unknown = ga.total("drop_wg_unknown_index")?;
    let no = c.output(&["ping", "-c", "3", "-i", "0.1", "-W", "1", "-q", "10.1.0.2"])?;
    assert!(!no.status.success(), "a removed peer's session still carries traffic");
    assert!(
        ga.total("drop_wg_unknown_index")? >= unknown + 3,
        "{}",
        ga.show()?["totals"]
    );

    // 2. `wg syncconf` (wireguard-tools) with B and C: C is back, B keeps
    // its session. subway handshakes with the re-added C at once.
    // What `wg-quick strip` gives: the key and port, and the peers.
    let conf = subway_testkit::work_dir().join(format!("{}.wg", ga.name));
    let iface = format!("[Interface]\nPrivateKey = {}\nListenPort = 51820\n", ka.0);
    let wg_peer = |k: &str, n: u8, nets: &str| {
        format!("\n[Peer]\nPublicKey = {k}\nEndpoint = 192.0.2.{n}:51820\nAllowedIPs = {nets}\n")
    };
    std::fs::write(
        &conf,
        iface.clone() + &wg_peer(&kb.1, 2, "10.2.0.0/24") + &wg_peer(&kc.1, 3, "10.3.0.0/24"),
    )?;
    host(&["wg", "syncconf", &ga.name, conf.to_str().unwrap()])?;
    ping_until(c, "10.1.0.2", 5).with_context(|| ga.proc.log_text())?;
    ping(a, "10.3.0.2", 3)?;
    // (Failed once in CI, 1 -> 2, cause unknown: the log says who initiated.)
    assert_eq!(
        handshakes(&kb.1)?,
        Some(b0),
        "syncconf renegotiated B\n{}\n{}",
        ga.show()?["peers"],
        ga.proc.log_text()
    );
    let wg = host(&["wg", "show", &ga.name, "allowed-ips"])?;
    assert!(wg.contains("10.3.0.0/24") && !wg.contains("10.22.0.0/24"), "{wg}");

    // 3. `wg syncconf` with B only: it sends `remove=true` for C.
    let only_b = iface.clone() + &wg_peer(&kb.1, 2, "10.2.0.0/24");
    std::fs::write(&conf, &only_b)?;
    host(&["wg", "syncconf", &ga.name, conf.to_str().unwrap()])?;
    let wg = host(&["wg", "show", &ga.name])?;
    assert!(!wg.contains(&kc.1) && wg.contains(&kb.1), "{wg}");
    let no = a.output(&["ping", "-c", "2", "-i", "0.1", "-W", "1", "-q", "10.3.0.2"])?;
    assert!(!no.status.success(), "C is still reachable after syncconf without it");

    // 4. `wg setconf` (replace_peers=true) with B and C: C is back; then
    // with B only: C goes again. B stays up throughout.
    std::fs::write(
        &conf,
        iface.clone() + &wg_peer(&kb.1, 2, "10.2.0.0/24") + &wg_peer(&kc.1, 3, "10.3.0.0/24"),
    )?;
    host(&["wg", "setconf", &ga.name, conf.to_str().unwrap()])?;
    ping_until(a, "10.3.0.2", 5).with_context(|| ga.proc.log_text())?;
    std::fs::write(&conf, &only_b)?;
    host(&["wg", "setconf", &ga.name, conf.to_str().unwrap()])?;
    let wg = host(&["wg", "show", &ga.name])?;
    assert!(!wg.contains(&kc.1) && wg.contains(&kb.1), "{wg}");
    ping(a, "10.2.0.2", 5)?;
    let no = a.output(&["ping", "-c", "2", "-i", "0.1", "-W", "1", "-q", "10.3.0.2"])?;
    assert!(!no.status.success(), "C is still reachable after setconf without it");
    assert_eq!(handshakes(&kb.1)?, Some(b0), "syncconf or setconf renegotiated B");
    Ok(())
}

#[test]
fn a_change_of_one_peers_routes_is_patched_in_and_the_kernel_and_fence_follow() -> Result<()> {
    if !require_root("a_change_of_one_peers_routes_is_patched_in_and_the_kernel_and_fence_follow") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    let c = wg_keypair()?;
    let peer_c = |nets: &str| {
        format!(
            "\n[Peer]\nPublicKey = {}\nEndpoint = 192.0.2.77:51820\nAllowedIPs = {nets}\n",
            c.1
        )
    };
    let ga = Subway::start_env(
        &t.gwa,
        &t.subway_config(true, false, &peer_c("10.98.0.0/24, 10.96.0.0/24")),
        &[
            ("RUST_LOG", "info,subway_dataplane=debug"),
            // A change that adds 10.95.0.0/24 fails at the kernel's route,
            // after its fence additions went in (see the end).
            ("SUBWAY_TEST_FAIL_TUN_ROUTE", "10.95.0.0/24"),
        ],
    )?;
    let gb = Subway::start(&t.gwb, &t.subway_config(false, false, ""))?;
    ping_until(&t.a, "10.2.0.2", 10).with_context(|| ga.proc.log_text())?;
    let table = format!("subway_{}", ga.name.replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
    let fenced = |ip: &str| -> bool {
        t.gwa
            .run(&[
                "nft",
                "get",
                "element",
                "inet",
                &table,
                "tunnel4",
                &format!("{{ {ip} }}"),
            ])
            .is_ok()
    };
    // What the IPv4 set holds, for the failures' messages.
    let tunnel4 = || {
        t.gwa
            .run(&["nft", "list", "set", "inet", &table, "tunnel4"])
            .unwrap_or_default()
    };
    assert!(
        fenced("10.98.0.5") && !fenced("10.97.0.5"),
        "the fence before the change"
    );

    // Only C's routes change: 10.98.0.0/24 goes, 10.97.0.0/24 comes.
    std::fs::write(
        &ga.config,
        t.subway_config(true, false, &peer_c("10.97.0.0/24, 10.96.0.0/24")),
    )?;
    let out = ga.ctl(&["reload", &ga.name])?;
    // The new prefix is fenced before the reload answers (before the
    // switch); the gone one is let go after it, off the reload's time.
    assert!(
        fenced("10.97.0.5") && fenced("10.96.0.5"),
        "the new prefix is not fenced when the reload answers: {}",
        t.gwa.run(&["nft", "list", "set", "inet", &table, "tunnel4"])?
    );
    assert!(
        out.contains("default:10.97.0.0/24") && out.contains("default:10.98.0.0/24"),
        "{out}"
    );
    let log = ga.proc.log_text();
    assert!(
        log.lines().any(|l| l.contains("applied") && l.contains("patched=true")),
        "the change was built anew, not patched:\n{log}"
    );
    // The workers, the kernel's routes and the fail-safe fence follow.
    let show = ga.show()?;
    assert!(has_route(&show, "10.97.0.0/24") && !has_route(&show, "10.98.0.0/24"));
    let got = ga.ctl(&["route", "get", "10.97.0.1", "--name", &ga.name])?;
    assert!(got.contains(&c.1), "{got}");
    assert!(t.gwa.run(&["ip", "route", "show", "10.98.0.0/24"])?.trim().is_empty());
    assert!(t.gwa.run(&["ip", "route", "show", "10.97.0.0/24"])?.contains("dev sw-"));
    wait_until("the fence lets go of the gone prefix", Duration::from_secs(2), || {
        Ok(!fenced("10.98.0.5"))
    })
    .with_context(tunnel4)?;
    let set = t.gwa.run(&["nft", "list", "set", "inet", &table, "tunnel4"])?;
    assert!(
        fenced("10.97.0.5") && fenced("10.96.0.5") && !set.contains("10.98."),
        "the fence after the change: {set}"
    );
    // And back: the spare copy, one change behind, is brought up to date.
    std::fs::write(
        &ga.config,
        t.subway_config(true, false, &peer_c("10.98.0.0/24, 10.96.0.0/24")),
    )?;
    ga.ctl(&["reload", &ga.name])?;
    assert!(fenced("10.98.0.5"), "not fenced when the reload answers");
    let show = ga.show()?;
    assert!(has_route(&show, "10.98.0.0/24") && !has_route(&show, "10.97.0.0/24"));
    wait_until("the fence lets go of 10.97.0.0/24", Duration::from_secs(2), || {
        Ok(!fenced("10.97.0.5"))
    })?;
    ping(&t.a, "10.2.0.2", 3)?;

    // A change that fails after its fence additions went in (the kernel
    // refuses the new prefix's route: the test hook) changes nothing: the
    // reload reports the error, the tables and the kernel's routes are as
    // they were, and the fence gives the addition back.
    std::fs::write(
        &ga.config,
        t.subway_config(true, false, &peer_c("10.98.0.0/24, 10.96.0.0/24, 10.95.0.0/24")),
    )?;
    let failed = ga.ctl(&["reload", &ga.name]);
    assert!(failed.is_err(), "the reload did not fail: {failed:?}");
    let show = ga.show()?;
    assert!(has_route(&show, "10.98.0.0/24") && !has_route(&show, "10.95.0.0/24"));
    assert!(t.gwa.run(&["ip", "route", "show", "10.95.0.0/24"])?.trim().is_empty());
    wait_until(
        "the fence gives back the failed change's prefix",
        Duration::from_secs(2),
        || Ok(!fenced("10.95.0.5")),
    )
    .with_context(tunnel4)?;
    assert!(
        fenced("10.98.0.5") && fenced("10.96.0.5"),
        "the fence lost a running prefix"
    );
    // The next change starts from what the sets really hold.
    std::fs::write(
        &ga.config,
        t.subway_config(true, false, &peer_c("10.97.0.0/24, 10.96.0.0/24")),
    )?;
    ga.ctl(&["reload", &ga.name])?;
    assert!(
        fenced("10.97.0.5") && fenced("10.96.0.5"),
        "not fenced when the reload answers"
    );
    wait_until("the fence lets go of 10.98.0.0/24", Duration::from_secs(2), || {
        Ok(!fenced("10.98.0.5"))
    })?;
    ping(&t.a, "10.2.0.2", 3)?;
    drop(gb);
    Ok(())
}
