//! `subway show` as an operator reads it: the text lists every non-zero
//! counter the JSON has, grouped, the control thread's among them (a
//! handshake flood shows there, not among the workers' drops); `--watch`
//! refreshes with per-peer rates.

use anyhow::Result;
use std::time::Duration;
use subway_testkit::{Subway, TwoSites, ping_until, require_root, workspace_bin};

#[test]
fn the_text_show_lists_a_handshake_flood_and_watch_shows_peer_rates() -> Result<()> {
    if !require_root("the_text_show_lists_a_handshake_flood_and_watch_shows_peer_rates") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    let ga = Subway::start(&t.gwa, &t.subway_config(true, false, ""))?;
    let _gb = Subway::start(&t.gwb, &t.subway_config(false, false, ""))?;
    ping_until(&t.a, "10.2.0.2", 10)?;
    // 2000 forged handshake initiations (right size, garbage MACs) from
    // the internet side.
    t.gwb.enter(|| -> Result<()> {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        let mut m = [0x5au8; 148];
        m[..4].copy_from_slice(&[1, 0, 0, 0]);
        for _ in 0..2000 {
            s.send_to(&m, "192.0.2.1:51820")?;
        }
        Ok(())
    })??;
    std::thread::sleep(Duration::from_millis(500));
    let text = ga.ctl(&["show", &ga.name])?;
    let json = ga.show()?;
    let bad = json["control"]["wg_bad_mac1"].as_u64().unwrap_or(0);
    assert!(bad >= 1000, "the flood was not counted: {json}");
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("control thread:"))
        .unwrap_or_default();
    assert!(line.contains(&format!("wg_bad_mac1={bad}")), "{text}");
    // Every non-zero counter of the JSON is in the text.
    for group in ["totals", "xdp", "xsk", "control"] {
        for (k, v) in json[group].as_object().into_iter().flatten() {
            if v.as_u64().unwrap_or(0) > 0 {
                assert!(
                    text.contains(&format!("{k}=")),
                    "{group}.{k} missing from the text:\n{text}"
                );
            }
        }
    }
    // --watch: refreshed once a second, with per-peer rates.
    let bin = workspace_bin("subway")?;
    let child = std::process::Command::new(&bin)
        .args(["show", &ga.name, "--watch"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(2500));
    // SAFETY: signalling a child we started, by its pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output()?;
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("per peer, last") && out.contains("pps"), "{out}");
    Ok(())
}
