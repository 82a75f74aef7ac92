//! The keys of each section: one parser per section, each given the
//! section's `Key = Value` lines in file order.

use super::values::{ErrFn, parse_bool, parse_key, parse_num, parse_prefixes, parse_ranges, vnet_name};
use super::{Config, ConfigError, ExportSection, HaSection, LanSection, PeerSection};
use std::net::{SocketAddr, ToSocketAddrs};
use subway_dataplane::{BindMode, XdpAttach};

/// A section's `Key = Value` lines, in file order: (key, value, line).
pub(super) type Entries = Vec<(String, String, usize)>;

/// wg-quick keys that are valid there but mean nothing to subway.
const WG_QUICK_IGNORED: &[&str] = &[
    "address",
    "dns",
    "mtu",
    "table",
    "preup",
    "postup",
    "predown",
    "postdown",
    "saveconfig",
    "fwmark",
];

fn unknown(cfg: &mut Config, section: &str, k: &str, line: usize, known: &str, err: &ErrFn) -> Result<(), ConfigError> {
    if WG_QUICK_IGNORED.contains(&k.to_ascii_lowercase().as_str()) && section == "Interface" {
        cfg.warnings.push(format!(
            "{}:{line}: {k} is a wg-quick setting subway does not use; it is ignored",
            cfg.path.display()
        ));
        return Ok(());
    }
    Err(err(
        line,
        format!("unknown key `{k}` in [{section}]: expected one of {known}"),
    ))
}

pub(super) fn parse_interface(cfg: &mut Config, sline: usize, kv: Entries, err: &ErrFn) -> Result<(), ConfigError> {
    cfg.interface.line = sline;
    for (k, v, line) in kv {
        match k.to_ascii_lowercase().as_str() {
            "privatekey" => cfg.interface.private_key = Some(parse_key(&v, "PrivateKey", line, err)?),
            "listenport" => cfg.interface.listen_port = Some(parse_num(&k, &v, line, err)?),
            "uplink" => cfg.interface.uplink = Some((v, line)),
            "failmode" => {
                cfg.interface.fail_open = match v.to_ascii_lowercase().as_str() {
                    "closed" => false,
                    "open" => true,
                    _ => {
                        return Err(err(
                            line,
                            format!(
                                "FailMode = {v}: expected `closed` (tunnelled prefixes stay refused by the kernel \
                                 while subway is stopped) or `open` (the kernel routes them after a clean stop)"
                            ),
                        ));
                    }
                }
            }
            _ => unknown(
                cfg,
                "Interface",
                &k,
                line,
                "PrivateKey, ListenPort, Uplink, FailMode",
                err,
            )?,
        }
    }
    Ok(())
}

pub(super) fn parse_lan(cfg: &mut Config, sline: usize, kv: Entries, err: &ErrFn) -> Result<(), ConfigError> {
    let mut iface = None;
    let mut subnets = Vec::new();
    let mut vnet = "default".to_string();
    let mut routes = Vec::new();
    for (k, v, line) in kv {
        match k.to_ascii_lowercase().as_str() {
            "interface" => {
                if v.is_empty() || v.len() > 15 || v.contains(['/', ' ']) {
                    return Err(err(line, format!("Interface `{v}` is not a valid interface name")));
                }
                iface = Some(v)
            }
            "subnets" => subnets.extend(parse_prefixes(&k, &v, line, err)?),
            "vnet" => vnet = vnet_name(&v, line, err)?,
            "route" => routes.push(parse_route(&v, line, err)?),
            _ => unknown(cfg, "Lan", &k, line, "Interface, Subnets, VNet, Route", err)?,
        }
    }
    let interface = iface.ok_or_else(|| err(sline, "[Lan] has no Interface: add `Interface = IFNAME`".into()))?;
    cfg.lans.push(LanSection {
        line: sline,
        interface,
        subnets,
        vnet,
        routes,
    });
    Ok(())
}

/// `PREFIX via HOP [HOP...]` (hops separated by spaces or commas).
fn parse_route(v: &str, line: usize, err: &ErrFn) -> Result<(ipnet::IpNet, Vec<std::net::IpAddr>, usize), ConfigError> {
    let usage = "write `Route = PREFIX via ROUTER`, e.g. `Route = 10.1.5.0/24 via 10.1.0.254` (several routers: ECMP)";
    let mut words = v.split([' ', ',', '\t']).filter(|w| !w.is_empty());
    let (Some(prefix), Some(via)) = (words.next(), words.next()) else {
        return Err(err(line, format!("Route `{v}`: {usage}")));
    };
    if !via.eq_ignore_ascii_case("via") {
        return Err(err(line, format!("Route `{v}`: {usage}")));
    }
    let prefix: ipnet::IpNet = prefix
        .parse()
        .map_err(|_| err(line, format!("Route `{v}`: `{prefix}` is not a prefix; {usage}")))?;
    let mut hops = Vec::new();
    for w in words {
        let hop: std::net::IpAddr = w
            .parse()
            .map_err(|_| err(line, format!("Route `{v}`: `{w}` is not an IP address; {usage}")))?;
        if hop.is_ipv4() != prefix.addr().is_ipv4() {
            return Err(err(
                line,
                format!("Route `{v}`: the router {hop} is not of the prefix's IP version"),
            ));
        }
        hops.push(hop);
    }
    if hops.is_empty() {
        return Err(err(line, format!("Route `{v}`: no router; {usage}")));
    }
    Ok((prefix.trunc(), hops, line))
}

pub(super) fn parse_peer(cfg: &mut Config, sline: usize, kv: Entries, err: &ErrFn) -> Result<(), ConfigError> {
    let mut pk = None;
    let mut psk = None;
    let mut endpoint = None;
    let mut allowed = Vec::new();
    let mut keepalive = None;
    let mut vnet = "default".to_string();
    let mut priority = None;
    let mut probe = None;
    let mut probe_interval = None;
    let mut probe_misses = None;
    for (k, v, line) in kv {
        match k.to_ascii_lowercase().as_str() {
            "priority" => priority = Some((parse_num::<u8>(&k, &v, line, err)?, line)),
            "probe" => {
                let a: std::net::IpAddr = v.parse().map_err(|_| {
                    err(
                        line,
                        format!("Probe `{v}` is not an IP address: name an address behind this peer that answers ping"),
                    )
                })?;
                probe = Some((a, line));
            }
            "probeinterval" => {
                let ms = parse_num::<u64>(&k, v.trim_end_matches("ms").trim(), line, err)?;
                if !(10..=60_000).contains(&ms) {
                    return Err(err(line, format!("ProbeInterval = {v}: between 10 and 60000 ms")));
                }
                probe_interval = Some((std::time::Duration::from_millis(ms), line));
            }
            "probemisses" => {
                let n = parse_num::<u32>(&k, &v, line, err)?;
                if !(1..=100).contains(&n) {
                    return Err(err(line, format!("ProbeMisses = {v}: between 1 and 100")));
                }
                probe_misses = Some((n, line));
            }
            "publickey" => pk = Some(parse_key(&v, "PublicKey", line, err)?),
            "presharedkey" => psk = Some(parse_key(&v, "PresharedKey", line, err)?),
            "endpoint" => {
                let addr = v.to_socket_addrs().ok().and_then(|mut a| a.next()).ok_or_else(|| {
                    err(
                        line,
                        format!("Endpoint `{v}` is not HOST:PORT (IPv6 as [addr]:port), or the host does not resolve"),
                    )
                })?;
                endpoint = Some(addr);
            }
            "allowedips" => allowed.extend(parse_prefixes(&k, &v, line, err)?.into_iter().map(|n| (n, line))),
            "persistentkeepalive" => {
                keepalive = match v.to_ascii_lowercase().as_str() {
                    "off" => None,
                    _ => Some(parse_num::<u16>(&k, &v, line, err)?).filter(|s| *s > 0),
                }
            }
            "vnet" => vnet = vnet_name(&v, line, err)?,
            _ => unknown(
                cfg,
                "Peer",
                &k,
                line,
                "PublicKey, PresharedKey, Endpoint, AllowedIPs, PersistentKeepalive, VNet, \
                 Priority, Probe, ProbeInterval, ProbeMisses",
                err,
            )?,
        }
    }
    let public_key = pk.ok_or_else(|| {
        err(
            sline,
            "[Peer] has no PublicKey: add the peer's `wg pubkey` output".into(),
        )
    })?;
    let group = match priority {
        Some((priority, priority_line)) => Some(super::GroupMember {
            priority,
            priority_line,
            probe,
            probe_interval: probe_interval.map_or(super::PROBE_INTERVAL, |p| p.0),
            probe_misses: probe_misses.map_or(super::PROBE_MISSES, |p| p.0),
        }),
        None => {
            if let Some(line) = probe
                .map(|p| p.1)
                .or(probe_interval.map(|p| p.1))
                .or(probe_misses.map(|p| p.1))
            {
                return Err(err(
                    line,
                    "probing is for route groups: give this peer a Priority too (and the same prefix to another \
                     [Peer] of its VNET), or remove the Probe keys"
                        .into(),
                ));
            }
            None
        }
    };
    cfg.peers.push(PeerSection {
        id: cfg.peers.len() as u32,
        line: sline,
        public_key,
        preshared_key: psk,
        endpoint,
        allowed_ips: allowed,
        persistent_keepalive: keepalive,
        vnet,
        group,
    });
    Ok(())
}

pub(super) fn parse_ha(cfg: &mut Config, sline: usize, kv: Entries, err: &ErrFn) -> Result<(), ConfigError> {
    let mut ha = HaSection {
        line: sline,
        virtual_addresses: Vec::new(),
    };
    for (k, v, line) in kv {
        match k.to_ascii_lowercase().as_str() {
            "virtualaddress" => {
                for w in v.split(',').map(str::trim).filter(|w| !w.is_empty()) {
                    // keepalived writes them as 10.1.0.1/24: the address is what counts.
                    let a: std::net::IpAddr = w.split('/').next().unwrap_or(w).parse().map_err(|_| {
                        err(
                            line,
                            format!(
                                "VirtualAddress `{w}` is not an IP address: list the addresses keepalived's \
                                 virtual_ipaddress moves, e.g. `VirtualAddress = 10.1.0.1, fd01::1`"
                            ),
                        )
                    })?;
                    if ha.virtual_addresses.contains(&a) {
                        return Err(err(line, format!("VirtualAddress {a} is listed twice")));
                    }
                    ha.virtual_addresses.push(a);
                }
            }
            _ => return Err(err(line, format!("unknown key `{k}` in [HA]: expected VirtualAddress"))),
        }
    }
    if ha.virtual_addresses.is_empty() {
        return Err(err(
            sline,
            "[HA] without a VirtualAddress: list the addresses keepalived moves to the active box \
             (this box is active while it holds one of them)"
                .into(),
        ));
    }
    cfg.ha = Some(ha);
    Ok(())
}

pub(super) fn parse_export(cfg: &mut Config, sline: usize, kv: Entries, err: &ErrFn) -> Result<(), ConfigError> {
    let mut e = ExportSection {
        line: sline,
        table: 0,
        protocol: 250,
        drain: std::time::Duration::from_secs(2),
    };
    for (k, v, line) in kv {
        match k.to_ascii_lowercase().as_str() {
            "table" => {
                let t: u32 = parse_num(&k, &v, line, err)?;
                if t == 0 || (253..=255).contains(&t) {
                    return Err(err(
                        line,
                        format!(
                            "Table = {t}: 0, 253 (default), 254 (main) and 255 (local) are the kernel's own; \
                             pick a table of subway's, e.g. 100"
                        ),
                    ));
                }
                e.table = t;
            }
            "protocol" => {
                let p: u8 = parse_num(&k, &v, line, err)?;
                if p <= 4 {
                    return Err(err(
                        line,
                        format!(
                            "Protocol = {p}: 0-4 are the kernel's (unspec, redirect, kernel, boot, static); pick e.g. 250"
                        ),
                    ));
                }
                e.protocol = p;
            }
            "drainseconds" => e.drain = std::time::Duration::from_secs(parse_num::<u64>(&k, &v, line, err)?),
            _ => {
                return Err(err(
                    line,
                    format!("unknown key `{k}` in [Export]: expected Table, Protocol, DrainSeconds"),
                ));
            }
        }
    }
    if e.table == 0 {
        return Err(err(
            sline,
            "[Export] without a Table: name the kernel routing table subway keeps its routes in, e.g. `Table = 100`"
                .into(),
        ));
    }
    cfg.export = Some(e);
    Ok(())
}

pub(super) fn parse_metrics(cfg: &mut Config, kv: Entries, err: &ErrFn) -> Result<(), ConfigError> {
    for (k, v, line) in kv {
        match k.to_ascii_lowercase().as_str() {
            "listen" => {
                let a: SocketAddr = v.parse().map_err(|_| {
                    err(
                        line,
                        format!("Listen = {v}: expected ADDRESS:PORT, like 127.0.0.1:9586 or [::1]:9586"),
                    )
                })?;
                cfg.metrics = Some((a, line));
            }
            _ => return Err(err(line, format!("unknown key `{k}` in [Metrics]: expected Listen"))),
        }
    }
    Ok(())
}

pub(super) fn parse_tuning(cfg: &mut Config, kv: Entries, err: &ErrFn) -> Result<(), ConfigError> {
    let t = &mut cfg.tuning;
    for (k, v, line) in kv {
        match k.to_ascii_lowercase().as_str() {
            "queues" => {
                let q = parse_ranges(&k, &v, line, err)?;
                if let Some(bad) = q.iter().find(|q| **q >= subway_common_max_queues()) {
                    return Err(err(
                        line,
                        format!(
                            "Queues: {bad} is beyond the highest queue subway serves ({})",
                            subway_common_max_queues() - 1
                        ),
                    ));
                }
                let mut sorted = q.clone();
                sorted.sort_unstable();
                if sorted.windows(2).any(|w| w[0] == w[1]) {
                    return Err(err(
                        line,
                        format!("Queues = {v} lists a queue twice: each queue gets one worker"),
                    ));
                }
                t.queues = Some(q)
            }
            "cores" => {
                t.cores = Some(
                    parse_ranges(&k, &v, line, err)?
                        .into_iter()
                        .map(|c| c as usize)
                        .collect(),
                )
            }
            "sourceports" => {
                let n: u16 = parse_num(&k, &v, line, err)?;
                if !(1..=super::MAX_SOURCE_PORTS).contains(&n) {
                    return Err(err(
                        line,
                        format!(
                            "SourcePorts = {n}: use 1 to {} (about the number of RX queues of the peers' NICs)",
                            super::MAX_SOURCE_PORTS
                        ),
                    ));
                }
                t.source_ports = Some(super::AtLine(n, line));
            }
            "batchsize" => t.xsk.batch_size = parse_num(&k, &v, line, err)?,
            "ringsize" => t.xsk.ring_size = parse_num(&k, &v, line, err)?,
            "framesize" => t.xsk.frame_size = parse_num(&k, &v, line, err)?,
            "xskmode" => t.xsk.bind = v.parse::<BindMode>().map_err(|e| err(line, e))?,
            "xdpmode" => t.xdp_mode = v.parse::<XdpAttach>().map_err(|e| err(line, e))?,
            "busypoll" => t.xsk.busy_poll = parse_bool(&k, &v, line, err)?,
            "needwakeup" => t.xsk.need_wakeup = parse_bool(&k, &v, line, err)?,
            "idlespin" => t.xsk.idle_spin = parse_num(&k, &v, line, err)?,
            "maxflows" => {
                let n: usize = parse_num(&k, &v, line, err)?;
                if !(1024..=1 << 24).contains(&n) {
                    return Err(err(
                        line,
                        format!("MaxFlows = {n}: use 1024 to 16777216 (16 bytes each)"),
                    ));
                }
                t.flows.max_flows = n;
            }
            "flowtimeouttcp" => t.flows.tcp_secs = flow_secs(&k, &v, line, err)?,
            "flowtimeoutudp" => t.flows.udp_secs = flow_secs(&k, &v, line, err)?,
            "flowtimeoutother" => t.flows.other_secs = flow_secs(&k, &v, line, err)?,
            _ => {
                return Err(err(
                    line,
                    format!(
                        "unknown key `{k}` in [Tuning]: expected one of Queues, Cores, SourcePorts, BatchSize, RingSize, FrameSize, XskMode, XdpMode, BusyPoll, NeedWakeup, IdleSpin, MaxFlows, FlowTimeoutTcp, FlowTimeoutUdp, FlowTimeoutOther"
                    ),
                ));
            }
        }
        // Defaults are valid, so the first invalid state is this line's doing.
        t.xsk.validate().map_err(|e| err(line, format!("[Tuning]: {e}")))?;
    }
    Ok(())
}

fn flow_secs(k: &str, v: &str, line: usize, err: &ErrFn) -> Result<u32, ConfigError> {
    let n: u32 = parse_num(k, v, line, err)?;
    if !(1..=86400 * 7).contains(&n) {
        return Err(err(line, format!("{k} = {n}: seconds, from 1 to 604800 (a week)")));
    }
    Ok(n)
}

fn subway_common_max_queues() -> u32 {
    subway_dataplane::MAX_QUEUES
}
