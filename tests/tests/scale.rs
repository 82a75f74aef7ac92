//! A gateway with a thousand peers, from a generated config: it starts,
//! carries traffic, and `subway show`, `subway route get` and `wg show`
//! answer correctly within a second each.

use anyhow::Result;
use std::time::{Duration, Instant};
use subway_testkit::{Subway, TwoSites, host, ping_until, require_root, workspace_bin};

/// Standard base64 of 32 bytes (a WireGuard key).
fn b64(bytes: &[u8; 32]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A distinct public key per peer (any 32 bytes is a Curve25519 point
/// WireGuard accepts; these peers never handshake).
fn key(i: usize) -> String {
    let mut k = [0u8; 32];
    for (j, b) in k.iter_mut().enumerate() {
        *b = (i.wrapping_mul(2654435761).wrapping_add(j * 40503) >> (j % 8)) as u8 ^ j as u8;
    }
    k[0] = (i & 0xff) as u8;
    k[1] = (i >> 8) as u8;
    b64(&k)
}

fn timed<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let t0 = Instant::now();
    let v = f()?;
    let took = t0.elapsed();
    eprintln!("{what}: {} ms", took.as_millis());
    assert!(took < Duration::from_secs(1), "{what} took {took:?}");
    Ok(v)
}

#[test]
fn a_thousand_peers_answer_show_route_get_and_wg_show_within_a_second() -> Result<()> {
    if !require_root("a_thousand_peers_answer_show_route_get_and_wg_show_within_a_second") {
        return Ok(());
    }
    let t = TwoSites::new()?;
    let mut cfg = t.subway_config(true, false, "");
    // 999 peers of ten prefixes each (10,000 routes, as in `subway-bench
    // scale`): a /24, and nine /28s of 100.64.0.0/10.
    for i in 0..999 {
        let more: Vec<String> = (0..9)
            .map(|k| {
                let j = (i * 9 + k) as u32;
                format!("{}/28", std::net::Ipv4Addr::from(0x6440_0000u32 + j * 16))
            })
            .collect();
        cfg += &format!(
            "\n[Peer]\nPublicKey = {}\nAllowedIPs = 10.{}.{}.0/24, {}\n",
            key(i),
            100 + i / 256,
            i % 256,
            more.join(", ")
        );
    }
    let path = subway_testkit::work_dir().join("thousand-peers.conf");
    std::fs::write(&path, &cfg)?;
    let bin = workspace_bin("subway")?;
    timed("subway check (1000 peers)", || {
        t.gwa
            .run(&[bin.to_str().unwrap(), "check", "--config", path.to_str().unwrap()])
    })?;
    let t0 = Instant::now();
    let ga = Subway::start(&t.gwa, &cfg)?;
    eprintln!("start to running (1000 peers): {} ms", t0.elapsed().as_millis());
    let _gb = Subway::start(&t.gwb, &t.subway_config(false, false, ""))?;
    // The tunnel to the one real peer works among the thousand.
    ping_until(&t.a, "10.2.0.2", 10)?;
    // The thousand routes to the TUN went in without overflowing the
    // socket that follows the kernel's route and neighbour changes (their
    // events are read as they come, between sends): no re-read of every
    // route and neighbour just after the start.
    let log = ga.proc.log_text();
    assert!(!log.contains("events lost"), "{log}");

    let v = timed("subway show --json", || ga.show())?;
    assert_eq!(v["peers"].as_array().map(|p| p.len()), Some(1000));
    let text = timed("subway show", || ga.ctl(&["show", &ga.name]))?;
    assert_eq!(text.matches("\n  peer ").count(), 1000);
    // Peer 300 serves 10.101.44.0/24.
    let got = timed("subway route get", || {
        ga.ctl(&["route", "get", "10.101.44.7", "--name", &ga.name])
    })?;
    assert!(got.contains("10.101.44.0/24") && got.contains(&key(300)), "{got}");
    let wg = timed("wg show", || host(&["wg", "show", &ga.name]))?;
    assert_eq!(wg.matches("peer: ").count(), 1000, "{wg}");
    assert!(wg.contains(&key(998)));
    // The questions over every route: 9,990 peer routes, none overlapping
    // another but the far site's (all pairs compared would be 50 million
    // comparisons on the control thread).
    let all: serde_json::Value = serde_json::from_str(&timed("subway route list", || {
        ga.ctl(&["route", "list", "--name", &ga.name, "--json"])
    })?)?;
    let listed = all.as_array().map_or(0, |r| r.len());
    assert!(listed >= 9_990, "{listed} routes listed");
    let overlaps: serde_json::Value = serde_json::from_str(&timed("subway route overlaps", || {
        ga.ctl(&["route", "overlaps", "--name", &ga.name, "--json"])
    })?)?;
    assert_eq!(overlaps, serde_json::json!([]));
    // One peer's /28: 100.64.0.0/10 + 16 x (300 x 9 + 4).
    let got = ga.ctl(&["route", "get", "100.64.169.7", "--name", &ga.name])?;
    assert!(got.contains("100.64.169.0/28") && got.contains(&key(300)), "{got}");
    Ok(())
}

/// Per-worker counter `k` of a gateway.
fn per_worker(gw: &Subway, k: &str) -> Result<Vec<u64>> {
    let v = gw.show()?;
    Ok(v["workers"]
        .as_array()
        .map(|ws| ws.iter().map(|w| w["counters"][k].as_u64().unwrap_or(0)).collect())
        .unwrap_or_default())
}

#[test]
fn one_peer_on_two_queues_keeps_both_workers_busy_both_ways_without_replay_drops() -> Result<()> {
    if !require_root("one_peer_on_two_queues_keeps_both_workers_busy_both_ways_without_replay_drops") {
        return Ok(());
    }
    // Every link has two queues: each gateway runs a worker per queue.
    // A LAN host's kernel spreads its flows over its two TX queues, so
    // both workers of the near gateway seal for the one peer; a worker
    // sends on its own queue, and veth delivers on the same queue at the
    // far gateway, so both of its workers open. (On a NIC, RSS hashes
    // the outer header instead: one peer's datagrams share one queue.)
    let t = TwoSites::with_queues(2)?;
    let ga = Subway::start(&t.gwa, &t.subway_config(true, false, ""))?;
    let gb = Subway::start(&t.gwb, &t.subway_config(false, false, ""))?;
    assert_eq!(ga.show()?["workers"].as_array().map(|w| w.len()), Some(2));
    ping_until(&t.a, "10.2.0.2", 10)?;
    // Eight flows each way at once (each a socket of its own: its own
    // source port), 1000 datagrams each.
    let mut flows = Vec::new();
    for i in 0..8u16 {
        flows.push(subway_testkit::UdpFlow::start(
            &t.a,
            &t.b,
            format!("10.2.0.2:{}", 7100 + i).parse()?,
            1000,
            500,
            200,
        )?);
        flows.push(subway_testkit::UdpFlow::start(
            &t.b,
            &t.a,
            format!("10.1.0.2:{}", 7200 + i).parse()?,
            1000,
            500,
            200,
        )?);
    }
    let mut lost = 0;
    for f in flows {
        let r = f.finish()?;
        lost += r.lost;
    }
    for (name, gw) in [("A", &ga), ("B", &gb)] {
        let tx = per_worker(gw, "tunnel_tx")?;
        let rx = per_worker(gw, "tunnel_rx")?;
        eprintln!("gateway {name}: tunnel_tx per worker {tx:?}, tunnel_rx per worker {rx:?}");
        assert!(
            tx.iter().all(|n| *n > 500),
            "gateway {name}: a worker sealed nothing: {tx:?}"
        );
        assert!(
            rx.iter().all(|n| *n > 500),
            "gateway {name}: a worker opened nothing: {rx:?}"
        );
        assert_eq!(
            gw.total("drop_wg_replayed")?,
            0,
            "gateway {name}: replay drops of legitimate packets"
        );
    }
    assert_eq!(lost, 0, "datagrams lost across the two workers");
    Ok(())
}
