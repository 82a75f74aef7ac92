//! Live changes: `subway reload` / SIGHUP and `wg set` both produce a new
//! configuration, and this applies the difference to the running gateway
//! without touching what did not change: peers are matched by public key,
//! an unchanged or changed peer keeps its id and its sessions, removed
//! peers' sessions end, new peers get new ids. The dataplane builds the new
//! FIB first (if that fails nothing changed), the workers switch to it
//! atomically, and steering entries for unchanged prefixes are never
//! touched, so their packets keep flowing.

use crate::config::{Config, PeerSection};
use crate::gateway::Gateway;
use anyhow::{Result, bail};
use serde_json::{Value, json};
// FxHash: keys and ids of 10,000 peers per reload, from the operator's file.
use subway_dataplane::Dataplane;
use subway_dataplane::fxhash::FxMap as HashMap;

/// What cannot change without a restart, as messages naming the line.
pub fn restart_needed(old: &Config, new: &Config) -> Vec<String> {
    let mut v = Vec::new();
    let at = |line: usize| format!("{}:{line}", new.path.display());
    let (oi, ni) = (&old.interface, &new.interface);
    if oi.private_key != ni.private_key {
        v.push(format!("{}: PrivateKey changed", at(ni.line)));
    }
    if oi.listen_port != ni.listen_port {
        v.push(format!("{}: ListenPort changed", at(ni.line)));
    }
    if oi.uplink.as_ref().map(|u| &u.0) != ni.uplink.as_ref().map(|u| &u.0) {
        v.push(format!(
            "{}: Uplink changed",
            at(ni.uplink.as_ref().map_or(ni.line, |u| u.1))
        ));
    }
    let lans = |c: &Config| {
        c.lans
            .iter()
            .map(|l| (l.interface.clone(), l.vnet.clone()))
            .collect::<Vec<_>>()
    };
    if lans(old) != lans(new) {
        let line = new.lans.first().map_or(1, |l| l.line);
        v.push(format!(
            "{}: the [Lan] interfaces or their VNETs changed (Subnets may change live)",
            at(line)
        ));
    }
    if old.tuning != new.tuning {
        v.push(format!("{}: [Tuning] changed", new.path.display()));
    }
    if old.metrics.map(|m| m.0) != new.metrics.map(|m| m.0) {
        v.push(format!(
            "{}: [Metrics] Listen changed",
            at(new.metrics.map_or(1, |m| m.1))
        ));
    }
    v
}

/// Gives `new`'s peers their ids: a peer already running (same public
/// key, same VNET) keeps its own, a new one takes the next free id (a peer
/// moved to another VNET is a new peer: nothing queued or keyed in one
/// VNET goes to another). Returns the ids of new peers.
pub fn assign_ids(old: &Config, new: &mut Config, next_id: u32) -> Vec<u32> {
    let mut next = next_id;
    let mut fresh = Vec::new();
    let same = |o: &PeerSection, p: &PeerSection| o.public_key.0 == p.public_key.0 && o.vnet == p.vnet;
    // A reload mostly finds the peers where they were: the one in the
    // same place is tried first, the others are looked up.
    let mut by_key: Option<HashMap<(&[u8; 32], &str), u32>> = None;
    for (i, p) in new.peers.iter_mut().enumerate() {
        if let Some(o) = old.peers.get(i)
            && same(o, p)
        {
            p.id = o.id;
            continue;
        }
        let by_key = by_key.get_or_insert_with(|| {
            old.peers
                .iter()
                .map(|o| ((&o.public_key.0, o.vnet.as_str()), o.id))
                .collect()
        });
        match by_key.get(&(&p.public_key.0, p.vnet.as_str())) {
            Some(id) => p.id = *id,
            None => {
                p.id = next;
                fresh.push(next);
                next += 1;
            }
        }
    }
    fresh
}

fn same_peer(a: &PeerSection, b: &PeerSection) -> bool {
    a.preshared_key == b.preshared_key
        && a.endpoint == b.endpoint
        && a.allowed_ips.len() == b.allowed_ips.len()
        && a.allowed_ips.iter().zip(&b.allowed_ips).all(|(x, y)| x.0 == y.0)
        && a.persistent_keepalive == b.persistent_keepalive
        && a.vnet == b.vnet
}

/// Applies `new` (peers, their routes, LAN subnets) to the running
/// instance and makes it the current configuration. On error nothing
/// changed.
pub fn apply(cfg: &mut Config, mut new: Config, gw: Option<&mut Gateway>, dp: &mut Dataplane) -> Result<Value> {
    let needs = restart_needed(cfg, &new);
    if !needs.is_empty() {
        bail!("not applied, these changes need a restart: {}", needs.join("; "));
    }
    new.known_vnets = cfg.vnet_ids();
    let next_id = gw.as_ref().map_or(0, |g| g.peer_slots());
    let fresh = assign_ids(cfg, &mut new, next_id);
    if gw.is_none() && !new.peers.is_empty() {
        bail!("not applied: this instance runs in routed mode (no peers at start); adding peers needs a restart");
    }
    if let Some(g) = gw.as_ref()
        && let Some(p) = new.peers.iter().find(|p| g.is_own_key(&p.public_key.0))
    {
        bail!(
            "not applied: peer {} has this gateway's own public key",
            p.public_key.to_base64()
        );
    }
    let mut keys: Vec<_> = new.peers.iter().map(|p| p.public_key.0).collect();
    keys.sort_unstable();
    if keys.windows(2).any(|w| w[0] == w[1]) {
        bail!("not applied: two peers have the same public key");
    }
    let mut dcfg = crate::dataplane_config(&new);
    dcfg.listen_port = gw.as_ref().map_or(0, |g| g.listen_port);
    // The dataplane first: if the new routes cannot be built, nothing changed.
    let routes = dp.apply(dcfg, &fresh).map_err(|e| match e {
        subway_dataplane::Error::NeedsRestart(why) => {
            anyhow::anyhow!(
                "not applied: {why}; restart the instance (systemctl restart subway@{})",
                cfg.name
            )
        }
        subway_dataplane::Error::Config(why) => anyhow::anyhow!("not applied: {why}; fix the file and reload again"),
        e => anyhow::anyhow!("not applied, nothing changed: {e}"),
    })?;
    let vnets = new.vnet_ids();
    let vnet_id = |n: &str| vnets.iter().position(|v| v == n).unwrap_or(0) as u32;
    let key = |p: &PeerSection| p.public_key.to_base64();
    let mut added = Vec::new();
    let mut removed = Vec::new();
    let mut changed = Vec::new();
    // From here nothing may fail: the workers already use the new tables.
    if let Some(g) = gw {
        // By id: ids are small and dense (the gateway's peer slots).
        let slots = cfg
            .peers
            .iter()
            .chain(&new.peers)
            .map(|p| p.id as usize + 1)
            .max()
            .unwrap_or(0);
        let mut old_by_id: Vec<Option<&PeerSection>> = vec![None; slots];
        for o in &cfg.peers {
            old_by_id[o.id as usize] = Some(o);
        }
        let mut stays = vec![false; slots];
        for p in &new.peers {
            stays[p.id as usize] = true;
        }
        for o in &cfg.peers {
            if !stays[o.id as usize] {
                g.remove_peer(o.id);
                removed.push(key(o));
            }
        }
        for p in &new.peers {
            match old_by_id[p.id as usize] {
                Some(o) if same_peer(o, p) => {}
                Some(_) => {
                    g.update_peer(p, vnet_id(&p.vnet));
                    changed.push(key(p));
                }
                None => {
                    // Keys were checked above (unique, not ours), so this
                    // cannot fail; if it did, the peer would have routes
                    // and no sessions: its packets wait, nothing leaks.
                    if let Err(e) = g.add_peer(p, vnet_id(&p.vnet)) {
                        tracing::error!("adding peer {}: {e:#}", key(p));
                    }
                    added.push(key(p));
                }
            }
        }
        g.publish_changed(dp);
    }
    let fmt = |v: &[(u32, ipnet::IpNet)]| {
        v.iter()
            .map(|(vn, n)| format!("{}:{n}", vnets.get(*vn as usize).map_or("?", |s| s.as_str())))
            .collect::<Vec<_>>()
    };
    // VNETs whose [Policy] was added, removed or changed.
    let mut policies: Vec<String> = cfg
        .policies
        .iter()
        .map(|p| &p.vnet)
        .chain(new.policies.iter().map(|p| &p.vnet))
        .filter(|v| {
            let rules = |c: &Config| {
                c.policies
                    .iter()
                    .find(|p| &&p.vnet == v)
                    .map(|p| (p.default, p.rules.iter().map(|r| r.text.clone()).collect::<Vec<_>>()))
            };
            rules(cfg) != rules(&new)
        })
        .cloned()
        .collect();
    policies.sort();
    policies.dedup();
    let summary = json!({
        "policies_changed": policies,
        "peers_added": added,
        "peers_removed": removed,
        "peers_changed": changed,
        "routes_added": fmt(&routes.added),
        "routes_removed": fmt(&routes.removed),
        "routes_changed": fmt(&routes.retargeted),
    });
    for w in &new.warnings {
        tracing::warn!("{w}");
    }
    new.warnings.clear();
    // The old config (10,000 peers and the text they were read from) is
    // freed on a thread of its own: not on the reload's time.
    subway_dataplane::lifecycle::free_elsewhere(std::mem::replace(cfg, new));
    Ok(summary)
}

/// `subway reload`: re-reads the file the instance was started with.
pub fn reload(cfg: &mut Config, gw: Option<&mut Gateway>, dp: &mut Dataplane) -> Result<Value> {
    let t0 = std::time::Instant::now();
    let new = Config::load_after(&cfg.path, Some(cfg)).map_err(|e| anyhow::anyhow!("not applied: {e}"))?;
    let loaded = t0.elapsed();
    new.check_interfaces()
        .map_err(|e| anyhow::anyhow!("not applied: {e}"))?;
    let read = t0.elapsed();
    let r = apply(cfg, new, gw, dp);
    tracing::debug!(
        load_ms = loaded.as_secs_f64() * 1e3,
        read_ms = read.as_secs_f64() * 1e3,
        total_ms = t0.elapsed().as_secs_f64() * 1e3,
        "reload"
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn key(b: u8) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode([b; 32])
    }

    fn cfg(peers: &[(u8, &str)], extra: &str) -> Config {
        let mut t = format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\nUplink = wan0\n[Lan]\nInterface = lan0\n{extra}",
            key(1)
        );
        for (k, nets) in peers {
            t += &format!("[Peer]\nPublicKey = {}\nAllowedIPs = {nets}\n", key(*k));
        }
        Config::parse(Path::new("/etc/subway/gw.conf"), &t).unwrap()
    }

    #[test]
    fn running_peers_keep_their_ids_and_new_ones_get_fresh_ids() {
        let old = cfg(&[(2, "10.2.0.0/24"), (3, "10.3.0.0/24"), (4, "10.4.0.0/24")], "");
        // 3 removed, 5 added before 2, 4 unchanged.
        let mut new = cfg(&[(5, "10.5.0.0/24"), (2, "10.2.0.0/24"), (4, "10.4.0.0/25")], "");
        let fresh = assign_ids(&old, &mut new, 3);
        let ids: Vec<u32> = new.peers.iter().map(|p| p.id).collect();
        assert_eq!(ids, vec![3, 0, 2]);
        assert_eq!(fresh, vec![3]);
        assert!(same_peer(&old.peers[0], &new.peers[1]));
        assert!(!same_peer(&old.peers[2], &new.peers[2]), "AllowedIPs changed");
    }

    #[test]
    fn interface_lan_tuning_and_metrics_changes_need_a_restart() {
        let old = cfg(&[(2, "10.2.0.0/24")], "");
        assert!(restart_needed(&old, &cfg(&[(3, "10.3.0.0/24")], "")).is_empty());
        let t = cfg(&[(2, "10.2.0.0/24")], "[Tuning]\nBatchSize = 32\n");
        let msgs = restart_needed(&old, &t);
        assert_eq!(msgs.len(), 1, "{msgs:?}");
        assert!(msgs[0].contains("[Tuning]"), "{msgs:?}");
        let l = cfg(&[(2, "10.2.0.0/24")], "[Lan]\nInterface = lan1\nVNet = red\n");
        let msgs = restart_needed(&old, &l);
        assert!(
            msgs[0].contains("/etc/subway/gw.conf:") && msgs[0].contains("[Lan]"),
            "{msgs:?}"
        );
    }

    /// Every branch: what needs a restart is named with its line, one
    /// message each; what may change live (Subnets, FailMode, peers) is not.
    #[test]
    fn every_restart_needing_change_is_named_and_live_ones_are_not() {
        let old = cfg(&[(2, "10.2.0.0/24")], "");
        let with = |interface: &str, extra: &str| -> Config {
            let t = format!(
                "[Interface]\n{interface}\n[Lan]\nInterface = lan0\n{extra}[Peer]\nPublicKey = {}\nAllowedIPs = 10.2.0.0/24\n",
                key(2)
            );
            Config::parse(Path::new("/etc/subway/gw.conf"), &t).unwrap()
        };
        let base = format!("PrivateKey = {}\nListenPort = 51820\nUplink = wan0", key(1));
        assert!(restart_needed(&old, &with(&base, "")).is_empty(), "the same file");
        let cases = [
            (base.replace(&key(1), &key(9)), "", "PrivateKey changed"),
            (base.replace("51820", "51821"), "", "ListenPort changed"),
            (base.replace("wan0", "wan1"), "", "Uplink changed"),
            (base.clone(), "[Lan]\nInterface = lan1\n", "the [Lan] interfaces"),
            (base.clone(), "[Tuning]\nRingSize = 4096\n", "[Tuning] changed"),
            (
                base.clone(),
                "[Metrics]\nListen = 127.0.0.1:9999\n",
                "[Metrics] Listen changed",
            ),
        ];
        for (interface, extra, want) in cases {
            let msgs = restart_needed(&old, &with(&interface, extra));
            assert_eq!(msgs.len(), 1, "{want}: {msgs:?}");
            assert!(
                msgs[0].contains(want) && msgs[0].starts_with("/etc/subway/gw.conf:"),
                "{msgs:?}"
            );
        }
        // Live: FailMode, a LAN's Subnets, the peers.
        let live = with(
            &(base.clone() + "\nFailMode = open"),
            "Subnets = 10.1.0.0/24, 10.1.1.0/24\n",
        );
        assert!(
            restart_needed(&old, &live).is_empty(),
            "{:?}",
            restart_needed(&old, &live)
        );
    }
}
