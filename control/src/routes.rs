//! Route questions, answered from the running instance's FIB: which route
//! and which peer serve an address, what every VNET routes, and which
//! prefixes overlap where.

use crate::config::Config;
use crate::protocol::RouteQuery;
use ipnet::IpNet;
use serde_json::{Value, json};
use std::net::IpAddr;
use subway_dataplane::fib::{Route, Target};
use subway_dataplane::tables::Port;

/// The running instance's answer to a route query.
pub fn answer(cfg: &Config, dp: &subway_dataplane::Dataplane, q: &RouteQuery) -> Value {
    let t = dp.tables();
    let views = views(cfg, t.fib.routes(), &t.ports);
    let known = |vnet: &str| cfg.vnet_ids().iter().any(|v| v == vnet);
    let unknown = |vnet: &str| {
        crate::protocol::error(format!(
            "no VNET named {vnet}: this instance has {}",
            cfg.vnet_ids().join(", ")
        ))
    };
    match q {
        RouteQuery::List { vnet } => list(&views, vnet.as_deref()),
        RouteQuery::Get { vnet, .. } if !known(vnet) => unknown(vnet),
        RouteQuery::Get { address, vnet } => get(&views, *address, vnet),
        RouteQuery::Overlaps => overlaps(&views),
        RouteQuery::Explain {
            vnet,
            src,
            dst,
            proto,
            port,
        } => explain(
            cfg,
            &t,
            &Probe {
                vnet,
                src: *src,
                dst: *dst,
                proto: proto.as_deref(),
                port: *port,
            },
            subway_dataplane::wg::Now::system().mono,
        ),
    }
}

/// A route as an operator reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteView {
    pub vnet: String,
    pub prefix: IpNet,
    /// "lan", "peer" or "local".
    pub kind: &'static str,
    /// The interface, the peer's public key, or "gateway".
    pub via: String,
    pub endpoint: Option<String>,
}

impl RouteView {
    fn json(&self) -> Value {
        json!({"vnet": self.vnet, "prefix": self.prefix.to_string(), "kind": self.kind, "via": self.via, "endpoint": self.endpoint})
    }
}

pub fn views(cfg: &Config, routes: &[Route], ports: &[Port]) -> Vec<RouteView> {
    let vnets = cfg.vnet_ids();
    let mut v: Vec<RouteView> = routes
        .iter()
        .map(|r| {
            let vnet = vnets
                .get(r.vnet as usize)
                .cloned()
                .unwrap_or_else(|| r.vnet.to_string());
            let (kind, via, endpoint) = match r.target {
                Target::Port(p) => (
                    "lan",
                    ports.get(p as usize).map(|p| p.name.clone()).unwrap_or_default(),
                    None,
                ),
                Target::Peer(id) => {
                    let p = cfg.peers.iter().find(|p| p.id == id);
                    (
                        "peer",
                        p.map(|p| p.public_key.to_base64()).unwrap_or_default(),
                        p.and_then(|p| p.endpoint).map(|e| e.to_string()),
                    )
                }
                Target::Local => ("local", "gateway".to_string(), None),
            };
            RouteView {
                vnet,
                prefix: r.prefix,
                kind,
                via,
                endpoint,
            }
        })
        .collect();
    v.sort_by(|a, b| {
        (&a.vnet, a.prefix.addr(), a.prefix.prefix_len()).cmp(&(&b.vnet, b.prefix.addr(), b.prefix.prefix_len()))
    });
    v
}

/// `subway route list [--vnet V]`.
pub fn list(views: &[RouteView], vnet: Option<&str>) -> Value {
    json!(
        views
            .iter()
            .filter(|r| vnet.is_none_or(|v| r.vnet == v))
            .map(RouteView::json)
            .collect::<Vec<_>>()
    )
}

/// `subway route get ADDRESS [--vnet V]`: the longest match, then the less
/// specific routes that would match if it went away.
pub fn get(views: &[RouteView], addr: IpAddr, vnet: &str) -> Value {
    let mut matches: Vec<&RouteView> = views
        .iter()
        .filter(|r| r.vnet == vnet && r.prefix.contains(&addr))
        .collect();
    matches.sort_by_key(|r| std::cmp::Reverse(r.prefix.prefix_len()));
    match matches.split_first() {
        None if vnet != "default" => json!({
            "address": addr.to_string(), "vnet": vnet, "route": null,
            "verdict": "no route: dropped (a non-default VNET's packets never reach the kernel's routing)",
        }),
        None => {
            json!({"address": addr.to_string(), "vnet": vnet, "route": null, "verdict": "no route: not steered, the kernel handles it"})
        }
        Some((best, rest)) => json!({
            "address": addr.to_string(),
            "vnet": vnet,
            "route": best.json(),
            "verdict": match best.kind {
                "peer" => format!("tunneled to peer {}", best.via),
                "lan" => format!("forwarded out of {}", best.via),
                _ => "an address of the gateway itself: the kernel handles it".to_string(),
            },
            "less_specific": rest.iter().map(|r| r.json()).collect::<Vec<_>>(),
        }),
    }
}

/// `subway route overlaps`: every pair of prefixes that overlap, in one
/// VNET (resolved by longest match) or across VNETs (kept apart).
pub fn overlaps(views: &[RouteView]) -> Value {
    let routed: Vec<&RouteView> = views.iter().filter(|r| r.kind != "local").collect();
    let mut out = Vec::new();
    for (i, a) in routed.iter().enumerate() {
        for b in &routed[i + 1..] {
            if a.prefix.contains(&b.prefix.network()) || b.prefix.contains(&a.prefix.network()) {
                let same = a.vnet == b.vnet;
                out.push(json!({
                    "a": a.json(),
                    "b": b.json(),
                    "same_vnet": same,
                    "resolution": if same { "longest prefix wins inside the VNET" } else { "separate VNETs: no interaction" },
                }));
            }
        }
    }
    json!(out)
}

/// The packet `route explain` follows.
pub struct Probe<'a> {
    pub vnet: &'a str,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: Option<&'a str>,
    pub port: Option<u16>,
}

/// `subway route explain --vnet V --src A --dst B [--proto P] [--port N]`:
/// what the gateway does with such a packet arriving on a LAN of VNET V,
/// step by step, and why it would drop it.
pub fn explain(cfg: &Config, t: &subway_dataplane::tables::Tables, probe: &Probe, now: std::time::Duration) -> Value {
    let Probe {
        vnet,
        src,
        dst,
        proto,
        port,
    } = *probe;
    let vnets = cfg.vnet_ids();
    let Some(vid) = vnets.iter().position(|v| v == vnet).map(|v| v as u32) else {
        return json!({"error": format!("no VNET named {vnet}: this instance has {}", vnets.join(", "))});
    };
    let mut steps: Vec<String> = Vec::new();
    let verdict;
    let multicast = match dst {
        IpAddr::V4(a) => a.is_multicast() || a.is_broadcast(),
        IpAddr::V6(a) => a.is_multicast() || (a.segments()[0] & 0xffc0) == 0xfe80,
    };
    let desc = format!(
        "{} {src} -> {dst}{}",
        proto.unwrap_or("ip"),
        port.map(|p| format!(" port {p}")).unwrap_or_default()
    );
    if multicast {
        steps.push("XDP: multicast, broadcast or link-local destination: passed to the kernel".into());
        verdict = "handled by the kernel, not subway".to_string();
    } else {
        match t.fib.lookup(vid, dst) {
            None if vid != 0 => {
                steps.push(format!(
                    "XDP: {dst} matches no routed prefix in VNET {vnet}: dropped (drop_vnet_no_route); a non-default VNET's packets never reach the kernel's routing"
                ));
                verdict = "dropped: no route in this VNET".to_string();
            }
            None => {
                steps.push(format!(
                    "XDP: {dst} matches no routed prefix in VNET {vnet}: passed to the kernel"
                ));
                verdict = "handled by the kernel, not subway".to_string();
            }
            Some((len, Target::Local)) if vid != 0 => {
                steps.push(format!(
                    "XDP: {dst}/{len} is an address of the gateway in VNET {vnet}: only ARP and NDP are answered there (the kernel could reply only through the default VNET's table); anything else is dropped (drop_vnet_local)"
                ));
                verdict = "dropped: the gateway answers only ARP and NDP in a non-default VNET".to_string();
            }
            Some((len, Target::Local)) => {
                steps.push(format!(
                    "XDP: {dst}/{len} is an address of the gateway: passed to the kernel"
                ));
                verdict = "delivered to the gateway itself by the kernel".to_string();
            }
            Some((len, Target::Port(p))) => {
                let port_v = t.ports.get(p as usize);
                let ifname = port_v.map(|p| p.name.as_str()).unwrap_or("?");
                steps.push(format!(
                    "XDP: {dst} matches a route of VNET {vnet}: redirected to the AF_XDP worker of its RX queue"
                ));
                steps.push(format!("FIB: longest match /{len} -> LAN interface {ifname}"));
                match port_v.and_then(|pv| t.neigh.get(pv.ifindex, dst)) {
                    Some(mac) => {
                        steps.push(format!(
                            "neighbour {dst} is {mac}: Ethernet rewritten, TTL - 1, sent on {ifname}"
                        ));
                        verdict = format!("forwarded out of {ifname} by the fast path");
                    }
                    None if vid != 0 => {
                        steps.push(format!(
                            "neighbour {dst} unknown on {ifname}: the control thread holds this packet (up to 3 per neighbour, 3 s) while the kernel resolves {dst} on {ifname}, then sends it there; the next ones take the fast path"
                        ));
                        verdict = format!("forwarded out of {ifname} (first packet once the neighbour answers)");
                    }
                    None => {
                        steps.push(format!(
                            "neighbour {dst} unknown on {ifname}: this packet goes to the kernel (slow-path TUN), which resolves it; the next ones take the fast path"
                        ));
                        verdict = format!("forwarded out of {ifname} (first packet through the kernel)");
                    }
                }
            }
            Some((len, Target::Peer(id))) => {
                let key = cfg
                    .peers
                    .iter()
                    .find(|p| p.id == id)
                    .map(|p| p.public_key.to_base64())
                    .unwrap_or_default();
                steps.push(format!(
                    "XDP: {dst} matches a route of VNET {vnet}: redirected to the AF_XDP worker of its RX queue"
                ));
                steps.push(format!("FIB: longest match /{len} -> peer {key}"));
                let rt = t.peers.get(id as usize);
                let session = rt.and_then(|r| r.session.as_ref()).filter(|s| s.can_send(now));
                let path = rt.and_then(|r| r.path);
                match (session, path) {
                    (Some(s), Some(p)) => {
                        steps.push(format!(
                            "session {} ({}) is up: sealed in place, sent from {} to {} via {}",
                            s.local_index,
                            if s.initiator {
                                "we initiated"
                            } else {
                                "the peer initiated"
                            },
                            p.src,
                            p.dst,
                            p.dst_mac
                        ));
                        if proto == Some("tcp") {
                            let mtu = t
                                .uplink
                                .and_then(|u| t.ports.get(u as usize))
                                .map(|u| u.mtu.saturating_sub(subway_dataplane::tunnel::TUNNEL_OVERHEAD))
                                .unwrap_or(1420);
                            steps.push(format!("TCP SYNs have their MSS clamped to fit the tunnel MTU {mtu}"));
                        }
                        verdict = format!("tunneled to peer {key}");
                    }
                    (None, _) => {
                        steps.push(if vid == 0 {
                            "no usable session: the packet is queued and a handshake starts (through the kernel route to the TUN)".into()
                        } else {
                            "no usable session: the worker hands the packet to the control thread, which queues it and starts a handshake".into()
                        });
                        verdict = format!("tunneled to peer {key} once the handshake completes");
                    }
                    (Some(_), None) => {
                        steps.push("the peer's endpoint or its next hop is not known yet: sent by the control thread through the kernel".into());
                        verdict = format!("tunneled to peer {key} (through the kernel path)");
                    }
                }
                // The reply's cryptokey check at this gateway.
                match t.fib.lookup(vid, src) {
                    Some((_, Target::Port(_))) | Some((_, Target::Local)) => steps.push(format!(
                        "replies from {dst} to {src} are accepted from that peer only if {dst}'s longest AllowedIPs match is that peer (cryptokey routing)"
                    )),
                    _ => steps.push(format!(
                        "note: {src} is not a LAN address of VNET {vnet}: replies to it would not be routed back to a LAN"
                    )),
                }
            }
        }
    }
    json!({"vnet": vnet, "packet": desc, "steps": steps, "verdict": verdict})
}

/// Golden tests: the JSON answers of a gateway with nested and overlapping
/// prefixes across three VNETs, built by the same code a running instance
/// uses (config parser, FIB builder, views, explain), compared with the
/// files in `control/golden/`. `SUBWAY_UPDATE_GOLDEN=1 cargo test` rewrites
/// them; review the diff before committing.
#[cfg(test)]
mod golden {
    use super::*;
    use std::path::{Path, PathBuf};
    use subway_dataplane::PeerRoutes;
    use subway_dataplane::tables::{NeighTable, PeerRt, Port, Tables};
    use subway_dataplane::wire::MacAddr;

    fn key(b: u8) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode([b; 32])
    }

    /// default: a LAN 10.1.0.0/16 with a nested /24 on a second LAN, a
    /// hub peer owning 10.0.0.0/8 (which holds both), a site peer nested in
    /// the hub's prefix. red and blue: the same LAN 192.168.1.0/24 and the
    /// same remote 10.0.0.0/24, blue with a nested /25 to a second peer.
    fn gateway() -> (Config, Tables) {
        let text = format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\nUplink = wan0\n\n\
             [Lan]\nInterface = lan0\nSubnets = 10.1.0.0/16\n\n\
             [Lan]\nInterface = lan1\nSubnets = 10.1.7.0/24\n\n\
             [Lan]\nInterface = lanr\nSubnets = 192.168.1.0/24\nVNet = red\n\n\
             [Lan]\nInterface = lanb\nSubnets = 192.168.1.0/24\nVNet = blue\n\n\
             [Peer]\nPublicKey = {}\nEndpoint = 192.0.2.2:51820\nAllowedIPs = 10.0.0.0/8\n\n\
             [Peer]\nPublicKey = {}\nEndpoint = 192.0.2.3:51820\nAllowedIPs = 10.2.0.0/16, 10.2.9.0/24\n\n\
             [Peer]\nPublicKey = {}\nEndpoint = 192.0.2.4:51820\nAllowedIPs = 10.0.0.0/24\nVNet = red\n\n\
             [Peer]\nPublicKey = {}\nEndpoint = 192.0.2.5:51820\nAllowedIPs = 10.0.0.0/24\nVNet = blue\n\n\
             [Peer]\nPublicKey = {}\nEndpoint = 192.0.2.6:51820\nAllowedIPs = 10.0.0.128/25\nVNet = blue\n",
            key(1),
            key(2),
            key(3),
            key(4),
            key(5),
            key(6)
        );
        let cfg = Config::parse(Path::new("/etc/subway/hub.conf"), &text).unwrap();
        let dcfg = crate::dataplane_config(&cfg);
        let lans: Vec<(String, u32, Vec<ipnet::IpNet>)> = dcfg
            .lans
            .iter()
            .map(|l| (l.ifname.clone(), l.vnet, l.subnets.clone()))
            .collect();
        let locals = [
            (0, "10.1.0.1/32".parse().unwrap()),
            (1, "192.168.1.1/32".parse().unwrap()),
            (2, "192.168.1.1/32".parse().unwrap()),
        ];
        let fib = subway_dataplane::fib_from(&lans, &locals, &dcfg.peers).unwrap();
        let ports = dcfg
            .lans
            .iter()
            .enumerate()
            .map(|(i, l)| Port {
                name: l.ifname.clone(),
                ifindex: 10 + i as u32,
                mac: MacAddr([2, 0, 0, 0, 0, i as u8]),
                vnet: l.vnet,
                mtu: 1500,
            })
            .collect();
        let mut neigh = NeighTable::default();
        neigh.insert(10, "10.1.0.20".parse().unwrap(), MacAddr([2, 0, 0, 0, 1, 0x20]));
        let peers = dcfg
            .peers
            .iter()
            .map(|p: &PeerRoutes| PeerRt {
                vnet: p.vnet,
                session: None,
                path: None,
                stats: Default::default(),
            })
            .collect();
        let t = Tables {
            fib: std::sync::Arc::new(fib),
            neigh,
            ports,
            peers,
            ..Default::default()
        };
        (cfg, t)
    }

    fn check(name: &str, got: &Value) {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("golden")
            .join(format!("{name}.json"));
        let text = serde_json::to_string_pretty(got).unwrap() + "\n";
        if std::env::var_os("SUBWAY_UPDATE_GOLDEN").is_some() {
            // Rewriting under CI would make the comparison pass by construction.
            assert!(
                std::env::var_os("CI").is_none(),
                "SUBWAY_UPDATE_GOLDEN is for a developer reviewing new answers, never under CI"
            );
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &text).unwrap();
            return;
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (SUBWAY_UPDATE_GOLDEN=1 creates it)", path.display()));
        let want: Value = serde_json::from_str(&want).unwrap();
        assert_eq!(got, &want, "{name} differs from {}:\n{text}", path.display());
    }

    #[test]
    fn route_get_across_three_vnets() {
        let (cfg, t) = gateway();
        let views = views(&cfg, t.fib.routes(), &t.ports);
        let answers: Vec<Value> = [
            ("10.1.7.9", "default"),   // LAN /24 inside LAN /16 inside the hub's /8
            ("10.2.9.1", "default"),   // the site's /24 inside its /16 inside the hub's /8
            ("10.200.0.1", "default"), // only the hub
            ("10.1.0.1", "default"),   // the gateway itself
            ("172.16.0.1", "default"), // nothing: the kernel
            ("10.0.0.5", "red"),       // same address, three answers
            ("10.0.0.5", "blue"),
            ("10.0.0.200", "blue"), // the nested /25
            ("10.2.9.1", "red"),    // default's prefix is not red's
        ]
        .iter()
        .map(|(a, v)| get(&views, a.parse().unwrap(), v))
        .collect();
        check("route_get", &json!(answers));
    }

    #[test]
    fn route_overlaps_across_three_vnets() {
        let (cfg, t) = gateway();
        let views = views(&cfg, t.fib.routes(), &t.ports);
        check("route_overlaps", &overlaps(&views));
        check("route_list_blue", &list(&views, Some("blue")));
    }

    #[test]
    fn route_explain_across_three_vnets() {
        let (cfg, t) = gateway();
        let now = std::time::Duration::from_secs(1000);
        let probe = |vnet, src: &str, dst: &str, proto, port| {
            explain(
                &cfg,
                &t,
                &Probe {
                    vnet,
                    src: src.parse().unwrap(),
                    dst: dst.parse().unwrap(),
                    proto,
                    port,
                },
                now,
            )
        };
        let answers = json!([
            probe("default", "10.1.0.20", "10.2.9.1", Some("tcp"), Some(443)),
            probe("default", "10.2.9.1", "10.1.0.20", None, None),
            probe("default", "10.2.9.1", "10.1.0.21", None, None),
            probe("default", "10.1.0.20", "172.16.0.9", Some("udp"), Some(53)),
            probe("default", "10.1.0.20", "224.0.0.251", None, None),
            probe("red", "192.168.1.10", "10.0.0.5", Some("icmp"), None),
            probe("red", "192.168.1.10", "10.2.9.1", None, None),
            probe("blue", "192.168.1.10", "10.0.0.200", None, None),
            probe("blue", "10.0.0.5", "192.168.1.10", None, None),
            probe("green", "10.0.0.5", "192.168.1.10", None, None),
        ]);
        check("route_explain", &answers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn v(vnet: &str, p: &str, kind: &'static str, via: &str) -> RouteView {
        RouteView {
            vnet: vnet.into(),
            prefix: p.parse().unwrap(),
            kind,
            via: via.into(),
            endpoint: None,
        }
    }

    fn table() -> Vec<RouteView> {
        vec![
            v("default", "10.0.0.0/8", "peer", "HUB"),
            v("default", "10.1.0.0/16", "peer", "SITE1"),
            v("default", "10.1.2.0/24", "lan", "lan0"),
            v("default", "10.1.2.1/32", "local", "gateway"),
            v("red", "10.1.0.0/16", "peer", "RED"),
            v("blue", "192.168.1.0/24", "peer", "BLUE"),
        ]
    }

    #[test]
    fn get_answers_the_longest_match_and_what_is_behind_it() {
        let got = get(&table(), "10.1.2.9".parse().unwrap(), "default");
        assert_eq!(
            got,
            json!({
                "address": "10.1.2.9", "vnet": "default",
                "route": {"vnet": "default", "prefix": "10.1.2.0/24", "kind": "lan", "via": "lan0", "endpoint": null},
                "verdict": "forwarded out of lan0",
                "less_specific": [
                    {"vnet": "default", "prefix": "10.1.0.0/16", "kind": "peer", "via": "SITE1", "endpoint": null},
                    {"vnet": "default", "prefix": "10.0.0.0/8", "kind": "peer", "via": "HUB", "endpoint": null},
                ],
            })
        );
        assert_eq!(
            get(&table(), "10.1.9.9".parse().unwrap(), "red")["verdict"],
            "tunneled to peer RED"
        );
        assert_eq!(get(&table(), "10.1.9.9".parse().unwrap(), "blue")["route"], Value::Null);
        assert_eq!(
            get(&table(), "10.1.2.1".parse().unwrap(), "default")["route"]["kind"],
            "local"
        );
    }

    #[test]
    fn overlaps_within_and_across_vnets() {
        let o = overlaps(&table());
        let pairs: Vec<(String, String, bool)> = o
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["a"]["prefix"].as_str().unwrap().to_string(),
                    p["b"]["prefix"].as_str().unwrap().to_string(),
                    p["same_vnet"].as_bool().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            pairs,
            vec![
                ("10.0.0.0/8".into(), "10.1.0.0/16".into(), true),
                ("10.0.0.0/8".into(), "10.1.2.0/24".into(), true),
                ("10.0.0.0/8".into(), "10.1.0.0/16".into(), false),
                ("10.1.0.0/16".into(), "10.1.2.0/24".into(), true),
                ("10.1.0.0/16".into(), "10.1.0.0/16".into(), false),
                ("10.1.2.0/24".into(), "10.1.0.0/16".into(), false),
            ]
        );
    }

    #[test]
    fn list_filters_by_vnet_and_views_name_things() {
        assert_eq!(list(&table(), Some("blue")).as_array().unwrap().len(), 1);
        assert_eq!(list(&table(), None).as_array().unwrap().len(), 6);
        let cfg = Config::parse(
            Path::new("/etc/subway/x.conf"),
            "[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\nUplink = wan0\n[Lan]\nInterface = lan0\n\
             [Peer]\nPublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\nEndpoint = 192.0.2.2:51820\nAllowedIPs = 10.2.0.0/24\n",
        )
        .unwrap();
        let routes = vec![
            Route {
                vnet: 0,
                prefix: "10.2.0.0/24".parse().unwrap(),
                target: Target::Peer(0),
            },
            Route {
                vnet: 0,
                prefix: "10.1.0.0/24".parse().unwrap(),
                target: Target::Port(0),
            },
        ];
        let ports = vec![Port {
            name: "lan0".into(),
            ifindex: 3,
            mac: Default::default(),
            vnet: 0,
            mtu: 1500,
        }];
        let vs = views(&cfg, &routes, &ports);
        assert_eq!(vs[0].via, "lan0");
        assert_eq!(vs[1].kind, "peer");
        assert_eq!(vs[1].endpoint.as_deref(), Some("192.0.2.2:51820"));
        assert_eq!(vs[1].via, "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=");
    }
}
