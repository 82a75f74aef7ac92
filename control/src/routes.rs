//! Route questions, answered from the running instance's FIB: which route
//! and which peer serve an address, what every VNET routes, and which
//! prefixes overlap where.

use crate::config::Config;
use crate::protocol::RouteQuery;
use ipnet::IpNet;
use serde_json::{Value, json};
use std::net::IpAddr;
use subway_dataplane::fib::Target;
use subway_dataplane::slowpath::Taker;
use subway_dataplane::tables::Tables;
use subway_dataplane::trace::{Ingress, Outcome, Probe, Proto, Trace};

/// The running instance's answer to a route query; `health(peer)` is a
/// route group member's health (up, and why).
pub fn answer(
    cfg: &Config,
    dp: &subway_dataplane::Dataplane,
    q: &RouteQuery,
    health: impl Fn(u32) -> Option<(bool, String)>,
) -> Answer {
    let t = dp.tables();
    let groups = Groups::of(cfg, health);
    let views = || {
        let mut views = views_for(&Names::of(cfg), &t, q);
        groups.apply(&mut views);
        views
    };
    let known = |vnet: &str| cfg.vnet_ids().iter().any(|v| v == vnet);
    let unknown = |vnet: &str| {
        crate::protocol::error(format!(
            "no VNET named {vnet}: this instance has {}",
            cfg.vnet_ids().join(", ")
        ))
    };
    Answer::Now(match q {
        // Every route of a VNET, or all of them: made into views and JSON
        // by the thread that writes the answer.
        RouteQuery::List { vnet } => {
            return Answer::List {
                names: Names::of(cfg),
                tables: t.clone(),
                groups,
                vnet: vnet.clone(),
            };
        }
        RouteQuery::Get { vnet, .. } if !known(vnet) => unknown(vnet),
        RouteQuery::Get { address, vnet } => get(&views(), *address, vnet),
        RouteQuery::Overlaps => overlaps(&views()),
        RouteQuery::Explain { vnet, .. } if !known(vnet) => unknown(vnet),
        RouteQuery::Explain { .. } => match probe(cfg, &t, q) {
            Ok(p) => {
                let now = subway_dataplane::wg::Now::system().mono;
                let tr = dp.explain(&p, now, &|id| peer_key(cfg, id));
                explained(cfg, &t, q, &tr)
            }
            Err(e) => crate::protocol::error(e),
        },
    })
}

/// A route query's answer. A list of every route (100,000 of them, 8 MB
/// of JSON) is made into views and JSON on the thread that writes it:
/// the control thread only gathers what it needs (the published tables,
/// the names and the route groups' health).
pub enum Answer {
    Now(Value),
    List {
        names: Names,
        tables: std::sync::Arc<Tables>,
        groups: Groups,
        /// The VNET asked for (all if None).
        vnet: Option<String>,
    },
}

impl serde::Serialize for Answer {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Answer::Now(v) => v.serialize(s),
            Answer::List {
                names,
                tables,
                groups,
                vnet,
            } => {
                let q = RouteQuery::List { vnet: vnet.clone() };
                let mut views = views_for(names, tables, &q);
                groups.apply(&mut views);
                list(&views, vnet.as_deref()).serialize(s)
            }
        }
    }
}

/// What a view of a route needs from the config, gathered on the control
/// thread so that views can be made elsewhere.
pub struct Names {
    vnets: Vec<String>,
    /// By peer id: its public key (base64) and configured endpoint.
    peers: std::collections::HashMap<u32, (String, Option<std::net::SocketAddr>)>,
}

impl Names {
    pub fn of(cfg: &Config) -> Names {
        Names {
            vnets: cfg.vnet_ids(),
            peers: cfg
                .peers
                .iter()
                .map(|p| (p.id, (p.public_key.to_base64(), p.endpoint)))
                .collect(),
        }
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
    /// A route through LAN routers: each router and its MAC if the
    /// neighbour mirror has it (the fast path forwards once it does).
    pub next_hops: Vec<(String, Option<String>)>,
    /// Where a route through routers comes from: "kernel" or "config".
    pub source: Option<&'static str>,
    /// A route group's members (a prefix several peers share): each
    /// peer's key, priority, health and whether it carries the prefix now.
    pub group: Vec<Value>,
}

/// The route groups: for each prefix several peers of a VNET share, its
/// members (the config refuses a shared prefix unless every peer listing
/// it is a route group member), each with its key, priority and health.
#[derive(Default)]
pub struct Groups(std::collections::HashMap<String, std::collections::HashMap<IpNet, Vec<Member>>>);

/// A route group member as `route get` and `route list` show it.
struct Member {
    key: String,
    priority: Option<u8>,
    up: bool,
    why: String,
}

impl Groups {
    /// The members of every route group of `cfg`, in the file's order,
    /// with `health(peer)` (None: not probed).
    pub fn of(cfg: &Config, health: impl Fn(u32) -> Option<(bool, String)>) -> Groups {
        let mut by_vnet: std::collections::HashMap<String, std::collections::HashMap<IpNet, Vec<Member>>> =
            Default::default();
        for p in cfg.peers.iter().filter(|p| p.group.is_some()) {
            let mut own: Vec<IpNet> = p.allowed_ips.iter().map(|(n, _)| n.trunc()).collect();
            own.sort_unstable();
            own.dedup();
            let (up, why) = health(p.id).unwrap_or((true, "not probed".into()));
            for n in own {
                by_vnet
                    .entry(p.vnet.clone())
                    .or_default()
                    .entry(n)
                    .or_default()
                    .push(Member {
                        key: p.public_key.to_base64(),
                        priority: p.group.as_ref().map(|g| g.priority),
                        up,
                        why: why.clone(),
                    });
            }
        }
        for prefixes in by_vnet.values_mut() {
            prefixes.retain(|_, members| members.len() > 1);
        }
        Groups(by_vnet)
    }

    /// Fills in the members of the peer routes in `views` that are a
    /// group's, and which of them carry it now.
    pub fn apply(&self, views: &mut [RouteView]) {
        for v in views.iter_mut().filter(|v| v.kind == "peer" || v.kind == "peers") {
            let Some(members) = self.0.get(&v.vnet).and_then(|g| g.get(&v.prefix.trunc())) else {
                continue;
            };
            let carrying: Vec<&str> = v.via.split(',').collect();
            v.group = members
                .iter()
                .map(|m| {
                    json!({
                        "peer": m.key,
                        "priority": m.priority,
                        "up": m.up,
                        "active": carrying.contains(&m.key.as_str()),
                        "why": m.why,
                    })
                })
                .collect();
        }
    }
}

impl RouteView {
    fn json(&self) -> Value {
        let mut v = json!({"vnet": self.vnet, "prefix": self.prefix.to_string(), "kind": self.kind, "via": self.via, "endpoint": self.endpoint});
        if !self.group.is_empty() {
            v["group"] = json!(self.group);
        }
        if let Some(src) = self.source {
            v["source"] = json!(src);
            v["next_hops"] = json!(
                self.next_hops
                    .iter()
                    .map(|(hop, mac)| json!({"address": hop, "mac": mac, "resolved": mac.is_some()}))
                    .collect::<Vec<_>>()
            );
        }
        v
    }
}

/// The routes `q` is about, as views: with 100,000 routes, making a view
/// of each costs the control thread ~60 ms, and `route get` needs the few
/// that hold its address.
fn views_for(names: &Names, t: &Tables, q: &RouteQuery) -> Vec<RouteView> {
    let vid = |vnet: &str| names.vnets.iter().position(|v| v == vnet).map(|i| i as u32);
    match q {
        RouteQuery::Get { address, vnet } => {
            let vid = vid(vnet);
            views_where(names, t, |r| Some(r.vnet) == vid && r.prefix.contains(address))
        }
        RouteQuery::List { vnet: Some(vnet) } => {
            let vid = vid(vnet);
            views_where(names, t, |r| Some(r.vnet) == vid)
        }
        // Answered from the packet's trace, not from views.
        RouteQuery::Explain { .. } => Vec::new(),
        RouteQuery::List { vnet: None } => views_where(names, t, |_| true),
        RouteQuery::Overlaps => {
            // Only the routes that overlap another.
            let routed: Vec<&subway_dataplane::fib::Route> = t
                .fib
                .routes()
                .iter()
                .filter(|r| !matches!(r.target, Target::Local))
                .collect();
            let pairs = overlapping(&routed.iter().map(|r| r.prefix).collect::<Vec<_>>());
            let involved: std::collections::HashSet<(u32, IpNet)> = pairs
                .iter()
                .flat_map(|&(i, j)| [i, j])
                .map(|i| (routed[i].vnet, routed[i].prefix))
                .collect();
            views_where(names, t, |r| involved.contains(&(r.vnet, r.prefix)))
        }
    }
}

/// Every route of the FIB as a view, sorted by VNET and prefix (what the
/// tests compare the narrower answers with).
#[cfg(test)]
pub fn views(cfg: &Config, t: &Tables) -> Vec<RouteView> {
    views_where(&Names::of(cfg), t, |_| true)
}

/// The routes of the FIB that `keep` accepts, as views sorted by VNET and
/// prefix.
pub fn views_where(names: &Names, t: &Tables, keep: impl Fn(&subway_dataplane::fib::Route) -> bool) -> Vec<RouteView> {
    let vnets = &names.vnets;
    let ports = &t.ports;
    let by_id = &names.peers;
    let mut v: Vec<RouteView> = t
        .fib
        .routes()
        .iter()
        .filter(|r| keep(r))
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
                    let p = by_id.get(&id);
                    (
                        "peer",
                        p.map(|p| p.0.clone()).unwrap_or_default(),
                        p.and_then(|p| p.1).map(|e| e.to_string()),
                    )
                }
                Target::Peers(set) => (
                    "peers",
                    t.fib
                        .peer_set(set)
                        .unwrap_or_default()
                        .iter()
                        .filter_map(|id| by_id.get(id))
                        .map(|p| p.0.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                    None,
                ),
                Target::Local => ("local", "gateway".to_string(), None),
                Target::Via(_) => (
                    "lan",
                    t.fib
                        .port_of(r.target)
                        .and_then(|p| ports.get(p as usize))
                        .map(|p| p.name.clone())
                        .unwrap_or_default(),
                    None,
                ),
            };
            let (next_hops, source) = match r.target {
                Target::Via(g) => match t.fib.group(g) {
                    Some(grp) => {
                        let ifindex = ports.get(grp.port as usize).map_or(0, |p| p.ifindex);
                        (
                            grp.hops
                                .iter()
                                .map(|h| (h.to_string(), t.neigh.get(ifindex, *h).map(|m| m.to_string())))
                                .collect(),
                            Some(grp.source.name()),
                        )
                    }
                    None => (Vec::new(), None),
                },
                _ => (Vec::new(), None),
            };
            RouteView {
                vnet,
                prefix: r.prefix,
                kind,
                via,
                endpoint,
                next_hops,
                source,
                group: Vec::new(),
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
    let pairs = overlapping(&routed.iter().map(|r| r.prefix).collect::<Vec<_>>());
    json!(
        pairs
            .into_iter()
            .map(|(i, j)| {
                let (a, b) = (routed[i], routed[j]);
                let same = a.vnet == b.vnet;
                json!({
                    "a": a.json(),
                    "b": b.json(),
                    "same_vnet": same,
                    "resolution": if same { "longest prefix wins inside the VNET" } else { "separate VNETs: no interaction" },
                })
            })
            .collect::<Vec<_>>()
    )
}

/// Every pair `(i, j)`, `i < j`, of overlapping prefixes in `nets`, in
/// that order. Two prefixes overlap when one holds the other, so a sweep
/// by first address (the wider first) with a stack of the prefixes that
/// hold the current address finds them in O(n log n + pairs), not by
/// comparing 100,000 routes with each other.
fn overlapping(nets: &[IpNet]) -> Vec<(usize, usize)> {
    let mut order: Vec<usize> = (0..nets.len()).collect();
    order.sort_by_key(|&i| {
        let n = nets[i].trunc();
        (
            n.addr().is_ipv6(),
            subway_dataplane::fib::addr_num(n.network()),
            n.prefix_len(),
        )
    });
    let mut pairs = Vec::new();
    // Each holds the next: what holds the top holds all below it.
    let mut open: Vec<usize> = Vec::new();
    for i in order {
        while open.last().is_some_and(|&o| !nets[o].contains(&nets[i].network())) {
            open.pop();
        }
        pairs.extend(open.iter().map(|&o| (o.min(i), o.max(i))));
        open.push(i);
    }
    pairs.sort_unstable();
    pairs
}

/// The packet a `route explain` query describes, on the tables `t`.
pub fn probe(cfg: &Config, t: &Tables, q: &RouteQuery) -> Result<Probe, String> {
    let RouteQuery::Explain {
        vnet,
        src,
        dst,
        proto,
        port,
        ttl,
        size,
        vlan,
        from,
    } = q
    else {
        return Err("not an explain query".into());
    };
    let vnets = cfg.vnet_ids();
    let vid = vnets
        .iter()
        .position(|v| v == vnet)
        .ok_or_else(|| format!("no VNET named {vnet}: this instance has {}", vnets.join(", ")))?;
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(format!("{src} and {dst} are of different IP versions"));
    }
    let proto = match proto.as_deref().unwrap_or("udp") {
        "tcp" => Proto::Tcp(port.unwrap_or(80)),
        "udp" => Proto::Udp(port.unwrap_or(53)),
        "icmp" | "icmp6" | "icmpv6" | "ping" => Proto::Icmp,
        other => return Err(format!("--proto {other}: use tcp, udp or icmp")),
    };
    let from = match from.as_deref() {
        None => None,
        Some(name) => Some(if let Some(i) = t.ports.iter().position(|p| p.name == name) {
            Ingress::Lan(i as u16)
        } else if let Some(p) = cfg.peers.iter().find(|p| p.public_key.to_base64() == name) {
            Ingress::Peer(p.id)
        } else {
            return Err(format!(
                "--from {name}: neither a [Lan] interface nor a peer's public key"
            ));
        }),
    };
    Ok(Probe {
        vnet: vid as u32,
        src: *src,
        dst: *dst,
        proto,
        ttl: *ttl,
        size: size.unwrap_or(0),
        vlan: *vlan,
        from,
    })
}

fn peer_key(cfg: &Config, id: u32) -> String {
    cfg.peers
        .iter()
        .find(|p| p.id == id)
        .map(|p| p.public_key.to_base64())
        .unwrap_or_else(|| format!("#{id}"))
}

/// `subway route explain`'s answer: the probe, where it entered, the
/// trace's steps, the verdict and the counter it would be counted under.
pub fn explained(cfg: &Config, t: &Tables, q: &RouteQuery, tr: &Trace) -> Value {
    let RouteQuery::Explain {
        vnet,
        src,
        dst,
        proto,
        port,
        ..
    } = q
    else {
        return crate::protocol::error("not an explain query");
    };
    let port_name = |p: u16| t.ports.get(p as usize).map_or("?".to_string(), |p| p.name.clone());
    let desc = format!(
        "{} {src} -> {dst}{}",
        proto.as_deref().unwrap_or("udp"),
        port.map(|p| format!(" port {p}")).unwrap_or_default()
    );
    let from = match tr.ingress {
        Some(Ingress::Lan(p)) => json!(port_name(p)),
        Some(Ingress::Peer(id)) => json!(format!("peer {}", peer_key(cfg, id))),
        None => Value::Null,
    };
    let verdict = match tr.outcome {
        Outcome::Lan(p) => format!("forwarded out of {} by the fast path", port_name(p)),
        Outcome::Tunnel(id) => format!("tunneled to peer {} by the fast path", peer_key(cfg, id)),
        Outcome::HandedOn(_, Taker::Kernel) => "handed to the kernel by the fast path".to_string(),
        Outcome::HandedOn(_, _) => "handed to the control thread by the fast path".to_string(),
        Outcome::Drop(_) | Outcome::XdpDrop(_) => "dropped".to_string(),
        Outcome::XdpPass(_) => "handled by the kernel, not subway".to_string(),
        Outcome::NoIngress => format!("VNET {vnet} has no LAN interface"),
    };
    json!({"vnet": vnet, "packet": desc, "from": from, "steps": tr.steps, "verdict": verdict, "counter": tr.counter()})
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
    use subway_dataplane::trace::trace;
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
            allowed: std::sync::Arc::new(subway_dataplane::plan::allowed_ips(&dcfg.peers)),
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
        let views = views(&cfg, &t);
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
        .map(|(a, v)| {
            let (address, vnet) = (a.parse().unwrap(), v.to_string());
            // Answered from the views `route get` makes (those holding
            // the address), and from all of them: the same.
            let asked = get(
                &views_for(&Names::of(&cfg), &t, &RouteQuery::Get { address, vnet }),
                address,
                v,
            );
            assert_eq!(asked, get(&views, address, v));
            asked
        })
        .collect();
        check("route_get", &json!(answers));
    }

    #[test]
    fn route_overlaps_across_three_vnets() {
        let (cfg, t) = gateway();
        let views = views(&cfg, &t);
        // From the routes that overlap another (what `route overlaps`
        // makes views of), and from all of them: the same.
        let asked = overlaps(&views_for(&Names::of(&cfg), &t, &RouteQuery::Overlaps));
        assert_eq!(asked, overlaps(&views));
        check("route_overlaps", &asked);
        check("route_list_blue", &list(&views, Some("blue")));
        // As the writing thread makes it from what the control thread
        // gathered: the same.
        let later = Answer::List {
            names: Names::of(&cfg),
            tables: std::sync::Arc::new(t.clone()),
            groups: Groups::of(&cfg, |_| None),
            vnet: Some("blue".into()),
        };
        check("route_list_blue", &serde_json::to_value(&later).unwrap());
    }

    #[test]
    fn route_explain_across_three_vnets() {
        let (cfg, t) = gateway();
        let now = std::time::Duration::from_secs(1000);
        let probe = |vnet: &str, src: &str, dst: &str, proto: Option<&str>, port, extra: &[(&str, &str)]| {
            let get = |k: &str| extra.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
            let q = RouteQuery::Explain {
                vnet: vnet.into(),
                src: src.parse().unwrap(),
                dst: dst.parse().unwrap(),
                proto: proto.map(Into::into),
                port,
                ttl: get("ttl").map_or(64, |v| v.parse().unwrap()),
                size: get("size").map(|v| v.parse().unwrap()),
                vlan: get("vlan").map(|v| v.parse().unwrap()),
                from: get("from"),
            };
            match super::probe(&cfg, &t, &q) {
                Ok(p) => explained(&cfg, &t, &q, &trace(&t, &p, now, &|id| peer_key(&cfg, id))),
                Err(e) => json!({ "error": e }),
            }
        };
        let answers = json!([
            probe("default", "10.1.0.20", "10.2.9.1", Some("tcp"), Some(443), &[]),
            probe("default", "10.2.9.1", "10.1.0.20", None, None, &[]),
            probe("default", "10.2.9.1", "10.1.0.21", None, None, &[]),
            probe("default", "10.2.9.1", "10.1.0.20", None, None, &[("ttl", "1")]),
            probe("default", "10.2.9.1", "10.1.0.20", None, None, &[("size", "1600")]),
            probe("default", "10.1.0.20", "10.1.7.9", None, None, &[("vlan", "12")]),
            probe("default", "10.1.0.20", "172.16.0.9", Some("udp"), Some(53), &[]),
            probe("red", "192.168.1.10", "10.0.0.5", Some("icmp"), None, &[]),
            probe("red", "192.168.1.10", "10.2.9.1", None, None, &[]),
            probe("red", "192.168.1.10", "192.168.1.1", None, None, &[]),
            probe("blue", "192.168.1.10", "10.0.0.200", None, None, &[]),
            probe("blue", "10.0.0.5", "192.168.1.10", None, None, &[]),
            probe("blue", "10.0.0.200", "192.168.1.10", None, None, &[("from", &key(5))]),
            probe("green", "10.0.0.5", "192.168.1.10", None, None, &[]),
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
            next_hops: Vec::new(),
            source: None,
            group: Vec::new(),
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

    /// The sweep finds exactly the pairs that comparing every prefix with
    /// every other finds, in the same order: nested, equal (one VNET's
    /// prefix in another's), disjoint, IPv4 beside IPv6.
    #[test]
    fn the_overlap_sweep_finds_what_all_pairs_find() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let nets: Vec<IpNet> = (0..600)
            .map(|_| {
                let r = next();
                if r % 7 == 0 {
                    let a =
                        std::net::Ipv6Addr::from(((0xfd00 + (r >> 8) % 4) as u128) << 112 | ((r >> 16) as u128) << 64);
                    IpNet::new(IpAddr::V6(a), 8 + (r % 57) as u8).unwrap().trunc()
                } else {
                    // Few distinct high bits: plenty of nesting.
                    let a = std::net::Ipv4Addr::from((10 << 24) | ((r >> 20) as u32 & 0x0303_ffff));
                    IpNet::new(IpAddr::V4(a), 8 + (r % 25) as u8).unwrap().trunc()
                }
            })
            .collect();
        let mut all = Vec::new();
        for i in 0..nets.len() {
            for j in i + 1..nets.len() {
                if nets[i].contains(&nets[j].network()) || nets[j].contains(&nets[i].network()) {
                    all.push((i, j));
                }
            }
        }
        assert!(
            all.len() > 1000,
            "a test with few overlaps proves little: {}",
            all.len()
        );
        assert_eq!(overlapping(&nets), all);
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
        let mut fib = subway_dataplane::fib::Fib::new();
        fib.insert(0, "10.2.0.0/24".parse().unwrap(), Target::Peer(0)).unwrap();
        fib.insert(0, "10.1.0.0/24".parse().unwrap(), Target::Port(0)).unwrap();
        let t = Tables {
            fib: fib.into(),
            ports: vec![subway_dataplane::tables::Port {
                name: "lan0".into(),
                ifindex: 3,
                mac: Default::default(),
                vnet: 0,
                mtu: 1500,
            }],
            ..Default::default()
        };
        let vs = views(&cfg, &t);
        assert_eq!(vs[0].via, "lan0");
        assert_eq!(vs[1].kind, "peer");
        assert_eq!(vs[1].endpoint.as_deref(), Some("192.0.2.2:51820"));
        assert_eq!(vs[1].via, "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=");
    }
}
