//! The file, line by line: section headers, `Key = Value` lines gathered
//! per section and handed to that section's parser (`sections`), keys
//! given twice, and the rules that span sections.

use super::sections::{
    Entries, parse_export, parse_ha, parse_interface, parse_lan, parse_metrics, parse_peer, parse_tuning,
};
use super::{Config, ConfigError, InterfaceSection, Key32, PeerTexts, Tuning};
use ipnet::IpNet;
use std::collections::HashMap;
use std::path::Path;
use subway_dataplane::fxhash::FxMap;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Section {
    None,
    Interface,
    Lan,
    Peer,
    Tuning,
    Metrics,
    Ha,
    Export,
    Policy,
}

/// [Peer] sections that may be kept for the next reload: the text after
/// the header (a range), its hash if known, the header's line, the
/// section's index in `peers`.
type Kept = Vec<(std::ops::Range<usize>, Option<u64>, usize, usize)>;

/// Where the next section header is at or after byte `at`: the start of
/// the first line whose first non-blank character is `[` (what the parser
/// takes for a header), or the end of `text`; and how many lines come
/// before it.
fn next_header(text: &str, mut at: usize) -> (usize, usize) {
    let mut lines = 0;
    while at < text.len() {
        let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
        if text[at..end].trim_start().starts_with('[') {
            return (at, lines);
        }
        lines += 1;
        at = end + 1;
    }
    (text.len(), lines)
}

/// Whether a [Peer] section's parse can be kept for the next reload: its
/// Endpoint (if any) is an address, not a name to resolve again.
fn endpoint_is_address(kv: &Entries) -> bool {
    kv.iter()
        .filter(|(k, _, _)| k.eq_ignore_ascii_case("endpoint"))
        .all(|(_, v, _)| v.parse::<std::net::SocketAddr>().is_ok())
}

impl Config {
    /// A config from text (the tests'; a file is read with `load`).
    #[cfg(test)]
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        Self::parse_inner(path, text, None, &mut Vec::new())
    }

    /// [`Config::parse`], taking the unchanged [Peer] sections from `prev`
    /// and keeping this file's sections for the next reload.
    pub(crate) fn parse_with(path: &Path, text: String, prev: Option<&Config>) -> Result<Config, ConfigError> {
        let mut kept = Vec::new();
        let mut cfg = Self::parse_inner(path, &text, prev, &mut kept)?;
        let mut texts = PeerTexts {
            text,
            ..Default::default()
        };
        let t0 = std::time::Instant::now();
        texts.by_hash.reserve(kept.len());
        texts.kept.reserve(kept.len());
        for (body, hash, line, i) in kept {
            texts.keep(body, hash, line, i);
        }
        cfg.peer_texts = Some(std::sync::Arc::new(texts.sorted()));
        tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, "kept the peer sections");
        Ok(cfg)
    }

    /// The parser. With `prev`, a [Peer] section whose text `prev` holds
    /// is taken from it; every [Peer] section that may be kept is listed
    /// in `kept` (its text after the header, the header's line, its index
    /// in `peers`).
    fn parse_inner(path: &Path, text: &str, prev: Option<&Config>, kept: &mut Kept) -> Result<Config, ConfigError> {
        let prev = prev.and_then(|c| Some((c.peer_texts.as_deref()?, c.peers.as_slice())));
        let err = |line: usize, msg: String| ConfigError {
            file: path.to_path_buf(),
            line,
            msg,
        };
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "subway".into());
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(err(
                0,
                format!(
                    "the instance name {name:?} (the file's stem) may only use letters, digits, '-', '_' and '.'; rename the file"
                ),
            ));
        }
        let mut cfg = Config {
            path: path.to_path_buf(),
            name,
            interface: InterfaceSection::default(),
            lans: Vec::new(),
            peers: Vec::new(),
            tuning: Tuning::default(),
            metrics: None,
            ha: None,
            export: None,
            policies: Vec::new(),
            warnings: Vec::new(),
            known_vnets: Vec::new(),
            peer_texts: None,
        };
        if let Some((_, peers)) = prev {
            cfg.peers.reserve(peers.len());
            kept.reserve(peers.len());
        }
        let mut section = Section::None;
        let mut seen_interface = false;
        let mut seen_tuning = false;
        // Raw key/values of the section being read, flushed at its end.
        let mut pending: Entries = Vec::new();
        let mut section_line = 0;

        let flush = |cfg: &mut Config, section: Section, line: usize, kv: &mut Entries| -> Result<(), ConfigError> {
            let kv = std::mem::take(kv);
            // Lists may be split over lines; any other key twice is a mistake.
            // (A section has a handful of keys: a scan, no allocation.)
            let lists = ["allowedips", "subnets", "route", "rule"];
            for (i, (k, _, l)) in kv.iter().enumerate() {
                if lists.iter().any(|x| k.eq_ignore_ascii_case(x)) {
                    continue;
                }
                if let Some((_, _, first)) = kv[..i].iter().find(|(o, _, _)| o.eq_ignore_ascii_case(k)) {
                    return Err(err(
                        *l,
                        format!("`{k}` is given twice in this section (first at line {first}): keep one"),
                    ));
                }
            }
            match section {
                Section::None => {
                    if let Some((k, _, l)) = kv.first() {
                        return Err(err(
                            *l,
                            format!(
                                "`{k}` is outside any section: put it under [Interface], [Lan], [Peer] or [Tuning]"
                            ),
                        ));
                    }
                    Ok(())
                }
                Section::Interface => parse_interface(cfg, line, kv, &err),
                Section::Lan => parse_lan(cfg, line, kv, &err),
                Section::Peer => parse_peer(cfg, line, kv, &err),
                Section::Tuning => parse_tuning(cfg, kv, &err),
                Section::Metrics => parse_metrics(cfg, kv, &err),
                Section::Ha => parse_ha(cfg, line, kv, &err),
                Section::Export => parse_export(cfg, line, kv, &err),
                Section::Policy => super::policy::parse_policy(cfg, line, kv, &err),
            }
        };

        // The [Peer] section being read: where its text starts (after the
        // header), and whether it may be kept.
        let mut peer_body: Option<usize> = None;
        let keep =
            |kept: &mut Kept, cfg: &Config, body: Option<usize>, end: usize, line: usize, ok: bool, warned: usize| {
                if let Some(start) = body
                    && ok
                    && cfg.warnings.len() == warned
                {
                    kept.push((start..end, None, line, cfg.peers.len() - 1));
                }
            };
        let (mut pos, mut lineno) = (0, 0);
        let t0 = std::time::Instant::now();
        while pos < text.len() {
            let start = pos;
            let end = text[pos..].find('\n').map_or(text.len(), |i| pos + i);
            pos = end + 1;
            lineno += 1;
            let raw = &text[start..end];
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            if line.starts_with('[') {
                if !line.ends_with(']') {
                    return Err(err(
                        lineno,
                        format!("malformed section header `{line}`: write it as [Name]"),
                    ));
                }
                let ok = section == Section::Peer && endpoint_is_address(&pending);
                let warned = cfg.warnings.len();
                flush(&mut cfg, section, section_line, &mut pending)?;
                if section == Section::Peer {
                    keep(kept, &cfg, peer_body.take(), start, section_line, ok, warned);
                }
                let name = line[1..line.len() - 1].trim().to_ascii_lowercase();
                section = match name.as_str() {
                    "interface" => {
                        if seen_interface {
                            return Err(err(
                                lineno,
                                "a second [Interface] section: merge it into the first".into(),
                            ));
                        }
                        seen_interface = true;
                        Section::Interface
                    }
                    "lan" => Section::Lan,
                    "metrics" => {
                        cfg.metrics = Some(("127.0.0.1:9586".parse().unwrap(), lineno));
                        Section::Metrics
                    }
                    "peer" => Section::Peer,
                    "policy" => Section::Policy,
                    "export" => {
                        if cfg.export.is_some() {
                            return Err(err(lineno, "a second [Export] section: merge it into the first".into()));
                        }
                        Section::Export
                    }
                    "ha" => {
                        if cfg.ha.is_some() {
                            return Err(err(lineno, "a second [HA] section: merge it into the first".into()));
                        }
                        Section::Ha
                    }
                    "tuning" => {
                        if seen_tuning {
                            return Err(err(lineno, "a second [Tuning] section: merge it into the first".into()));
                        }
                        seen_tuning = true;
                        Section::Tuning
                    }
                    _ => {
                        return Err(err(
                            lineno,
                            format!(
                                "unknown section [{}]: subway knows [Interface], [Lan], [Peer], [Policy], [HA], [Export], [Tuning] and [Metrics]",
                                &line[1..line.len() - 1]
                            ),
                        ));
                    }
                };
                section_line = lineno;
                if section == Section::Peer {
                    let (body_end, body_lines) = next_header(text, pos.min(text.len()));
                    let body = &text[pos.min(text.len())..body_end];
                    // Unchanged since the last read: taken as it was.
                    let hash = prev.map(|_| PeerTexts::hash(body));
                    if let Some(mut p) = prev.and_then(|(texts, peers)| texts.find(peers, body, hash?, lineno)) {
                        p.id = cfg.peers.len() as u32;
                        cfg.peers.push(p);
                        kept.push((pos.min(text.len())..body_end, hash, lineno, cfg.peers.len() - 1));
                        lineno += body_lines;
                        pos = body_end;
                        section = Section::None;
                        continue;
                    }
                    peer_body = Some(pos.min(text.len()));
                }
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                return Err(err(lineno, format!("expected `Key = Value`, found `{line}`")));
            };
            let (k, v) = (k.trim(), v.trim());
            if k.is_empty() {
                return Err(err(lineno, "a value with no key before the `=`".into()));
            }
            pending.push((k.to_string(), v.to_string(), lineno));
        }
        let ok = section == Section::Peer && endpoint_is_address(&pending);
        let warned = cfg.warnings.len();
        flush(&mut cfg, section, section_line, &mut pending)?;
        if section == Section::Peer {
            keep(kept, &cfg, peer_body.take(), text.len(), section_line, ok, warned);
        }
        let t_sections = t0.elapsed();
        cfg.validate()?;
        let t_validate = t0.elapsed() - t_sections;
        let w = cfg.check_policies()?;
        tracing::debug!(
            sections_ms = t_sections.as_secs_f64() * 1e3,
            validate_ms = t_validate.as_secs_f64() * 1e3,
            policies_ms = (t0.elapsed() - t_sections - t_validate).as_secs_f64() * 1e3,
            "parsed"
        );
        cfg.warnings.extend(w);
        Ok(cfg)
    }

    /// Rules that span sections.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.lans.is_empty() {
            return Err(self.err(
                0,
                "no [Lan] section: add one with `Interface = IFNAME` for each interface facing a local subnet".into(),
            ));
        }
        let mut ifaces: HashMap<&str, usize> = HashMap::new();
        for l in &self.lans {
            if let Some(prev) = ifaces.insert(&l.interface, l.line) {
                return Err(self.err(
                    l.line,
                    format!(
                        "interface {} is already a [Lan] at line {prev}: list it once",
                        l.interface
                    ),
                ));
            }
        }
        // FxHash: 100,000 prefixes are hashed twice here, and a config
        // file is the operator's own (no flooding to fear).
        let claims: usize = self.peers.iter().map(|p| p.allowed_ips.len()).sum::<usize>()
            + self
                .lans
                .iter()
                .map(|l| l.subnets.len() + l.routes.len())
                .sum::<usize>();
        // Keyed by the VNET's index, not its name: no string is hashed or
        // compared per prefix.
        let vnets = self.vnet_ids();
        let vid = |name: &str| vnets.iter().position(|v| v == name).unwrap_or(0) as u32;
        let mut subnets: FxMap<(u32, IpNet), usize> = FxMap::with_capacity_and_hasher(claims, Default::default());
        for l in &self.lans {
            let v = vid(&l.vnet);
            for s in &l.subnets {
                if let Some(prev) = subnets.insert((v, s.trunc()), l.line) {
                    return Err(self.err(l.line, format!("subnet {s} in VNET {} is also claimed by the [Lan] at line {prev}: each prefix belongs to one interface per VNET", l.vnet)));
                }
            }
        }
        if !self.peers.is_empty() && self.interface.uplink.is_none() {
            return Err(self.err(
                self.interface.line,
                "peers are configured but [Interface] has no Uplink: add `Uplink = IFNAME`, the interface toward the peers".into(),
            ));
        }
        if let Some(super::AtLine(n, line)) = self.tuning.source_ports.filter(|s| s.0 > 1) {
            match self.interface.listen_port {
                None | Some(0) => {
                    return Err(self.err(
                        line,
                        format!("SourcePorts = {n} needs a fixed ListenPort in [Interface]: the ports are ListenPort .. ListenPort + {}", n - 1),
                    ));
                }
                Some(p) if p as u32 + n as u32 - 1 > u16::MAX as u32 => {
                    return Err(self.err(
                        line,
                        format!("SourcePorts = {n} from ListenPort {p} goes past port 65535: lower ListenPort or SourcePorts"),
                    ));
                }
                _ => {}
            }
        }
        if !self.peers.is_empty() && self.interface.private_key.is_none() {
            return Err(self.err(
                self.interface.line,
                "peers are configured but [Interface] has no PrivateKey: generate one with `wg genkey`".into(),
            ));
        }
        let mut keys: FxMap<Key32, usize> = FxMap::with_capacity_and_hasher(self.peers.len(), Default::default());
        // One owner per prefix and VNET, whether a LAN or a peer. Most
        // files claim each prefix once: one sort of plain numbers finds
        // that out, and the map (with the first claimant's line for the
        // message) is built only when some prefix is claimed twice.
        // (IPv4 as one number: VNET, address, length; IPv6 as two. A
        // stable sort: files often list prefixes in order, and it finds
        // the runs.)
        let (mut v4, mut v6): (Vec<u128>, Vec<(u128, u64)>) = (Vec::with_capacity(claims), Vec::new());
        let mut add = |v: u32, n: &IpNet| match n.trunc() {
            IpNet::V4(n) => v4.push((v as u128) << 40 | (u32::from(n.network()) as u128) << 8 | n.prefix_len() as u128),
            IpNet::V6(n) => v6.push((u128::from(n.network()), (v as u64) << 8 | n.prefix_len() as u64)),
        };
        for l in &self.lans {
            let v = vid(&l.vnet);
            l.subnets.iter().for_each(|s| add(v, s));
            l.routes.iter().for_each(|r| add(v, &r.0));
        }
        for p in &self.peers {
            let v = vid(&p.vnet);
            p.allowed_ips.iter().for_each(|(n, _)| add(v, n));
        }
        v4.sort();
        v6.sort();
        let shared = v4.windows(2).any(|w| w[0] == w[1]) || v6.windows(2).any(|w| w[0] == w[1]);
        let mut owners: FxMap<(u32, IpNet), usize> = subnets;
        for l in &self.lans {
            for (net, hops, line) in &l.routes {
                if let Some(h) = hops
                    .iter()
                    .find(|h| !l.subnets.is_empty() && !l.subnets.iter().any(|s| s.contains(*h)))
                {
                    return Err(self.err(
                        *line,
                        format!(
                            "Route {net}: the router {h} is not on {}'s Subnets ({}): a next hop must be a neighbour on that LAN",
                            l.interface,
                            l.subnets.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(", ")
                        ),
                    ));
                }
                if let Some(p) = self.peers.iter().find(|p| {
                    p.vnet == l.vnet
                        && p.allowed_ips
                            .iter()
                            .any(|(a, _)| a.contains(&net.network()) || net.contains(&a.network()))
                }) {
                    return Err(self.err(
                        *line,
                        format!(
                            "Route {net} overlaps the AllowedIPs of the [Peer] at line {} in VNET {}: a prefix is behind a LAN router or a peer, not both",
                            p.line, l.vnet
                        ),
                    ));
                }
                if shared && let Some(prev) = owners.insert((vid(&l.vnet), *net), *line) {
                    return Err(self.err(
                        *line,
                        format!(
                            "Route {net} in VNET {} is already claimed at line {prev}: one owner per prefix and VNET",
                            l.vnet
                        ),
                    ));
                }
            }
        }
        for p in &self.peers {
            if let Some(prev) = keys.insert(p.public_key, p.line) {
                return Err(self.err(
                    p.line,
                    format!("this PublicKey is already the [Peer] at line {prev}: merge the two sections"),
                ));
            }
            if !shared {
                continue;
            }
            let v = vid(&p.vnet);
            for (net, line) in &p.allowed_ips {
                if let Some(prev) = owners.insert((v, net.trunc()), *line) {
                    // A route group: every claimant is a peer with a Priority.
                    let claimants: Vec<&super::PeerSection> = self
                        .peers
                        .iter()
                        .filter(|q| q.vnet == p.vnet && q.allowed_ips.iter().any(|(n, _)| n.trunc() == net.trunc()))
                        .collect();
                    let lan = self.lans.iter().any(|l| {
                        l.vnet == p.vnet
                            && (l.subnets.iter().any(|s| s.trunc() == net.trunc())
                                || l.routes.iter().any(|r| r.0.trunc() == net.trunc()))
                    });
                    if lan || claimants.iter().any(|q| q.group.is_none()) {
                        return Err(self.err(
                            *line,
                            format!(
                                "AllowedIPs {net} in VNET {} is already claimed at line {prev}: a prefix routes to one peer \
                                 or LAN per VNET; remove one, put them in different VNETs, or make the peers a route group \
                                 (a Priority on each: higher preferred, equal shared by flow; and a Probe)",
                                p.vnet
                            ),
                        ));
                    }
                }
            }
        }
        // The XDP program's route tables hold MAX_ROUTES per family, all
        // VNETs together (a prefix shared by a route group counts once).
        let limit = subway_dataplane::MAX_ROUTES as usize;
        // Under the limit with duplicates counted, it is under without:
        // the exact count (and the line that goes over) only when needed.
        let mut per_family = [0usize; 2];
        for (net, _) in self.peers.iter().flat_map(|p| &p.allowed_ips) {
            per_family[matches!(net, IpNet::V6(_)) as usize] += 1;
        }
        let lan_claims: usize = self.lans.iter().map(|l| l.subnets.len() + l.routes.len()).sum();
        if per_family.iter().all(|n| n + lan_claims <= limit) {
            return self.validate_groups();
        }
        let mut seen: FxMap<(u32, IpNet), ()> = FxMap::with_capacity_and_hasher(claims, Default::default());
        let mut per_family = [0usize; 2];
        let claims = self
            .lans
            .iter()
            .flat_map(|l| {
                l.subnets
                    .iter()
                    .map(move |s| (vid(&l.vnet), *s, l.line))
                    .chain(l.routes.iter().map(move |r| (vid(&l.vnet), r.0, r.2)))
            })
            .chain(self.peers.iter().flat_map(|p| {
                let v = vid(&p.vnet);
                p.allowed_ips.iter().map(move |(n, line)| (v, *n, *line))
            }));
        for (vnet, net, line) in claims {
            if seen.insert((vnet, net.trunc()), ()).is_some() {
                continue;
            }
            let fam = matches!(net, IpNet::V6(_)) as usize;
            per_family[fam] += 1;
            if per_family[fam] > limit {
                return Err(self.err(
                    line,
                    format!(
                        "{net} is IPv{} route number {}: the XDP program's tables hold {limit} routes per family (all VNETs together); aggregate prefixes, or split the peers over two gateways",
                        if fam == 1 { 6 } else { 4 },
                        per_family[fam]
                    ),
                ));
            }
        }
        self.validate_groups()
    }

    /// Route groups: each member shares a prefix with another peer of its
    /// VNET (only members can share one: `validate` refuses the rest) and
    /// can be probed through its tunnel.
    fn validate_groups(&self) -> Result<(), ConfigError> {
        let members = || self.peers.iter().filter(|p| p.group.is_some());
        // How many members claim each prefix: linear, not members x peers.
        let mut claimed: FxMap<(&str, IpNet), usize> = FxMap::default();
        for p in members() {
            let mut own: Vec<IpNet> = p.allowed_ips.iter().map(|(n, _)| n.trunc()).collect();
            own.sort_unstable();
            own.dedup();
            for n in own {
                *claimed.entry((p.vnet.as_str(), n)).or_default() += 1;
            }
        }
        for p in members() {
            let Some(g) = &p.group else { continue };
            let shares = p
                .allowed_ips
                .iter()
                .any(|(net, _)| claimed.get(&(p.vnet.as_str(), net.trunc())).is_some_and(|n| *n > 1));
            if !shares {
                return Err(self.err(
                    g.priority_line,
                    format!(
                        "Priority on a peer that shares no prefix with another [Peer] of VNET {}: a route group needs \
                         the same AllowedIPs prefix on two or more peers of one VNET; remove the Priority",
                        p.vnet
                    ),
                ));
            }
            let Some((probe, probe_line)) = g.probe else {
                return Err(self.err(
                    p.line,
                    "a route group member needs `Probe = ADDRESS`: an address behind this peer that answers ping \
                     through its tunnel (its LAN address, say), so that subway knows when it is down"
                        .into(),
                ));
            };
            if !p.allowed_ips.iter().any(|(n, _)| n.contains(&probe)) {
                return Err(self.err(
                    probe_line,
                    format!("Probe {probe} is not in this peer's AllowedIPs: its answer would not be accepted from this peer"),
                ));
            }
            if p.vnet != "default" {
                return Err(self.err(
                    probe_line,
                    format!(
                        "route groups are for the default VNET today (the answers to a non-default VNET's probes do \
                         not reach subway yet); VNET {} cannot have one",
                        p.vnet
                    ),
                ));
            }
        }
        Ok(())
    }
}
