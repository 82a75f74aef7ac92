//! subway's configuration file: a superset of wg-quick's format.
//!
//! ```text
//! [Interface]            PrivateKey, ListenPort, Uplink, FailMode (subway's)
//! [Lan]      (1 or more) Interface, Subnets, VNet
//! [Peer]     (0 or more) PublicKey, PresharedKey, Endpoint, AllowedIPs,
//!                        PersistentKeepalive, VNet
//! [Tuning]   (optional)  Queues, Cores, BatchSize, RingSize, FrameSize,
//!                        XskMode, XdpMode, BusyPoll, NeedWakeup, IdleSpin
//! ```
//!
//! Keys and section names are case-insensitive, as in wg-quick. wg-quick
//! keys subway does not use are accepted with a warning. Every error names
//! the file and line, says what is wrong and what to do.

use base64::Engine;
use ipnet::IpNet;
use std::collections::HashMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use subway_dataplane::{BindMode, XdpAttach, XskOptions};

/// A config error: where, what, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub msg: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.msg)
        } else {
            write!(f, "{}:{}: {}", self.file.display(), self.line, self.msg)
        }
    }
}

impl std::error::Error for ConfigError {}

/// A 32-byte Curve25519 key, from base64.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key32(pub [u8; 32]);

impl fmt::Debug for Key32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key32({})", base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

impl Key32 {
    pub fn to_base64(self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InterfaceSection {
    pub line: usize,
    pub private_key: Option<Key32>,
    pub listen_port: Option<u16>,
    pub uplink: Option<(String, usize)>,
    /// `FailMode = open`: the fail-safe fence on the peers' prefixes is
    /// removed on a clean stop. The default (`closed`) keeps it in the
    /// kernel after a clean stop too, until the next start or `subway down`.
    pub fail_open: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LanSection {
    pub line: usize,
    pub interface: String,
    pub subnets: Vec<IpNet>,
    pub vnet: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSection {
    /// The peer's id on the WireGuard device and in the FIB: its position
    /// in the file at start, kept for its life across reloads and `wg set`.
    pub id: u32,
    pub line: usize,
    pub public_key: Key32,
    pub preshared_key: Option<Key32>,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<(IpNet, usize)>,
    pub persistent_keepalive: Option<u16>,
    pub vnet: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tuning {
    pub queues: Option<Vec<u32>>,
    pub cores: Option<Vec<usize>>,
    pub xsk: XskOptions,
    pub xdp_mode: XdpAttach,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub path: PathBuf,
    /// The instance name: the file's stem, as with wg-quick.
    pub name: String,
    pub interface: InterfaceSection,
    pub lans: Vec<LanSection>,
    pub peers: Vec<PeerSection>,
    pub tuning: Tuning,
    /// Prometheus endpoint, if a [Metrics] section asks for one.
    pub metrics: Option<(SocketAddr, usize)>,
    pub warnings: Vec<String>,
    /// VNET names a running instance already numbered (see `vnet_ids`).
    pub known_vnets: Vec<String>,
}

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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Section {
    None,
    Interface,
    Lan,
    Peer,
    Tuning,
    Metrics,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: 0,
            msg: format!("cannot read the config file: {e}"),
        })?;
        let mut cfg = Self::parse(path, &text)?;
        // As wg-quick does: a private key others can read is no secret.
        use std::os::unix::fs::PermissionsExt;
        if cfg.interface.private_key.is_some()
            && let Ok(m) = std::fs::metadata(path)
            && m.permissions().mode() & 0o077 != 0
        {
            cfg.warnings.push(format!(
                "{}: holds a private key and is readable by group or others (mode {:o}): chmod 600 {}",
                path.display(),
                m.permissions().mode() & 0o777,
                path.display()
            ));
        }
        Ok(cfg)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
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
            warnings: Vec::new(),
            known_vnets: Vec::new(),
        };
        let mut section = Section::None;
        let mut seen_interface = false;
        let mut seen_tuning = false;
        // Raw key/values of the section being read, flushed at its end.
        let mut pending: Vec<(String, String, usize)> = Vec::new();
        let mut section_line = 0;

        let flush = |cfg: &mut Config,
                     section: Section,
                     line: usize,
                     kv: &mut Vec<(String, String, usize)>|
         -> Result<(), ConfigError> {
            let kv = std::mem::take(kv);
            // Lists may be split over lines; any other key twice is a mistake.
            let mut seen: HashMap<String, usize> = HashMap::new();
            for (k, _, l) in &kv {
                let lk = k.to_ascii_lowercase();
                if lk == "allowedips" || lk == "subnets" {
                    continue;
                }
                if let Some(first) = seen.insert(lk, *l) {
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
            }
        };

        for (i, raw) in text.lines().enumerate() {
            let lineno = i + 1;
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
                flush(&mut cfg, section, section_line, &mut pending)?;
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
                                "unknown section [{}]: subway knows [Interface], [Lan], [Peer], [Tuning] and [Metrics]",
                                &line[1..line.len() - 1]
                            ),
                        ));
                    }
                };
                section_line = lineno;
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
        flush(&mut cfg, section, section_line, &mut pending)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn err(&self, line: usize, msg: String) -> ConfigError {
        ConfigError {
            file: self.path.clone(),
            line,
            msg,
        }
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
        let mut subnets: HashMap<(&str, IpNet), usize> = HashMap::new();
        for l in &self.lans {
            for s in &l.subnets {
                if let Some(prev) = subnets.insert((&l.vnet, s.trunc()), l.line) {
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
        if !self.peers.is_empty() && self.interface.private_key.is_none() {
            return Err(self.err(
                self.interface.line,
                "peers are configured but [Interface] has no PrivateKey: generate one with `wg genkey`".into(),
            ));
        }
        let mut keys: HashMap<Key32, usize> = HashMap::new();
        // One owner per prefix and VNET, whether a LAN or a peer.
        let mut owners: HashMap<(&str, IpNet), usize> = subnets;
        for p in &self.peers {
            if let Some(prev) = keys.insert(p.public_key, p.line) {
                return Err(self.err(
                    p.line,
                    format!("this PublicKey is already the [Peer] at line {prev}: merge the two sections"),
                ));
            }
            for (net, line) in &p.allowed_ips {
                if let Some(prev) = owners.insert((&p.vnet, net.trunc()), *line) {
                    return Err(self.err(
                        *line,
                        format!("AllowedIPs {net} in VNET {} is already claimed at line {prev}: a prefix routes to one peer or LAN per VNET; remove one, or put them in different VNETs", p.vnet),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks that every interface named in the file exists on this host.
    pub fn check_interfaces(&self) -> Result<(), ConfigError> {
        let link = |n: &str| subway_dataplane::netlink::link_by_name(n).ok().flatten();
        for l in &self.lans {
            match link(&l.interface) {
                None => {
                    let msg = format!("interface {} does not exist on this host: check `ip link`", l.interface);
                    return Err(self.err(l.line, msg));
                }
                Some(k) if k.kind != 1 => {
                    let msg = format!(
                        "interface {} is not Ethernet: subway routes Ethernet frames",
                        l.interface
                    );
                    return Err(self.err(l.line, msg));
                }
                Some(_) => {}
            }
        }
        if let Some((u, line)) = &self.interface.uplink
            && link(u).is_none()
        {
            let msg = format!("Uplink interface {u} does not exist on this host: check `ip link`");
            return Err(self.err(*line, msg));
        }
        Ok(())
    }

    /// Dense VNET ids: `default` is 0, others in order of appearance. A
    /// reloaded config keeps the numbers of the VNETs it already had
    /// (`known_vnets`), so the XDP program's keys stay valid.
    pub fn vnet_ids(&self) -> Vec<String> {
        let mut v = if self.known_vnets.is_empty() {
            vec!["default".to_string()]
        } else {
            self.known_vnets.clone()
        };
        for n in self
            .lans
            .iter()
            .map(|l| &l.vnet)
            .chain(self.peers.iter().map(|p| &p.vnet))
        {
            if !v.contains(n) {
                v.push(n.clone());
            }
        }
        v
    }
}

type ErrFn<'a> = dyn Fn(usize, String) -> ConfigError + 'a;

fn parse_key(v: &str, what: &str, line: usize, err: &ErrFn) -> Result<Key32, ConfigError> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(v).map_err(|_| {
        err(
            line,
            format!("{what} is not valid base64: paste the key as `wg genkey` / `wg pubkey` print it"),
        )
    })?;
    let arr: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| {
        err(
            line,
            format!(
                "{what} decodes to {} bytes, a WireGuard key has 32: paste the whole key",
                b.len()
            ),
        )
    })?;
    Ok(Key32(arr))
}

fn parse_bool(k: &str, v: &str, line: usize, err: &ErrFn) -> Result<bool, ConfigError> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err(err(line, format!("{k} = {v}: use true or false"))),
    }
}

fn parse_num<T: std::str::FromStr>(k: &str, v: &str, line: usize, err: &ErrFn) -> Result<T, ConfigError> {
    v.parse()
        .map_err(|_| err(line, format!("{k} = {v}: expected a number")))
}

fn list(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// "0,2,4-7" -> [0,2,4,5,6,7]
fn parse_ranges(k: &str, v: &str, line: usize, err: &ErrFn) -> Result<Vec<u32>, ConfigError> {
    let mut out = Vec::new();
    for item in list(v) {
        if let Some((a, b)) = item.split_once('-') {
            let (a, b): (u32, u32) = (parse_num(k, a.trim(), line, err)?, parse_num(k, b.trim(), line, err)?);
            if a > b || b - a > 1024 {
                return Err(err(line, format!("{k} = {v}: range {item} is backwards or too long")));
            }
            out.extend(a..=b);
        } else {
            out.push(parse_num(k, item, line, err)?);
        }
    }
    if out.is_empty() {
        return Err(err(
            line,
            format!("{k} is empty: list numbers like 0,1 or a range like 0-3"),
        ));
    }
    Ok(out)
}

fn parse_prefixes(k: &str, v: &str, line: usize, err: &ErrFn) -> Result<Vec<IpNet>, ConfigError> {
    list(v)
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    err(
                        line,
                        format!("{k}: `{s}` is not a prefix like 10.0.0.0/24 or fd00::/64"),
                    )
                })
        })
        .collect()
}

fn vnet_name(v: &str, line: usize, err: &ErrFn) -> Result<String, ConfigError> {
    if v.is_empty() || v.len() > 32 || !v.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c)) {
        return Err(err(
            line,
            format!("VNet `{v}`: use up to 32 letters, digits, '-' or '_'"),
        ));
    }
    Ok(v.to_string())
}

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

fn parse_interface(
    cfg: &mut Config,
    sline: usize,
    kv: Vec<(String, String, usize)>,
    err: &ErrFn,
) -> Result<(), ConfigError> {
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

fn parse_lan(cfg: &mut Config, sline: usize, kv: Vec<(String, String, usize)>, err: &ErrFn) -> Result<(), ConfigError> {
    let mut iface = None;
    let mut subnets = Vec::new();
    let mut vnet = "default".to_string();
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
            _ => unknown(cfg, "Lan", &k, line, "Interface, Subnets, VNet", err)?,
        }
    }
    let interface = iface.ok_or_else(|| err(sline, "[Lan] has no Interface: add `Interface = IFNAME`".into()))?;
    cfg.lans.push(LanSection {
        line: sline,
        interface,
        subnets,
        vnet,
    });
    Ok(())
}

fn parse_peer(
    cfg: &mut Config,
    sline: usize,
    kv: Vec<(String, String, usize)>,
    err: &ErrFn,
) -> Result<(), ConfigError> {
    let mut pk = None;
    let mut psk = None;
    let mut endpoint = None;
    let mut allowed = Vec::new();
    let mut keepalive = None;
    let mut vnet = "default".to_string();
    for (k, v, line) in kv {
        match k.to_ascii_lowercase().as_str() {
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
                "PublicKey, PresharedKey, Endpoint, AllowedIPs, PersistentKeepalive, VNet",
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
    cfg.peers.push(PeerSection {
        id: cfg.peers.len() as u32,
        line: sline,
        public_key,
        preshared_key: psk,
        endpoint,
        allowed_ips: allowed,
        persistent_keepalive: keepalive,
        vnet,
    });
    Ok(())
}

fn parse_metrics(cfg: &mut Config, kv: Vec<(String, String, usize)>, err: &ErrFn) -> Result<(), ConfigError> {
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

fn parse_tuning(cfg: &mut Config, kv: Vec<(String, String, usize)>, err: &ErrFn) -> Result<(), ConfigError> {
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
            "batchsize" => t.xsk.batch_size = parse_num(&k, &v, line, err)?,
            "ringsize" => t.xsk.ring_size = parse_num(&k, &v, line, err)?,
            "framesize" => t.xsk.frame_size = parse_num(&k, &v, line, err)?,
            "xskmode" => t.xsk.bind = v.parse::<BindMode>().map_err(|e| err(line, e))?,
            "xdpmode" => t.xdp_mode = v.parse::<XdpAttach>().map_err(|e| err(line, e))?,
            "busypoll" => t.xsk.busy_poll = parse_bool(&k, &v, line, err)?,
            "needwakeup" => t.xsk.need_wakeup = parse_bool(&k, &v, line, err)?,
            "idlespin" => t.xsk.idle_spin = parse_num(&k, &v, line, err)?,
            _ => {
                return Err(err(
                    line,
                    format!(
                        "unknown key `{k}` in [Tuning]: expected one of Queues, Cores, BatchSize, RingSize, FrameSize, XskMode, XdpMode, BusyPoll, NeedWakeup, IdleSpin"
                    ),
                ));
            }
        }
        // Defaults are valid, so the first invalid state is this line's doing.
        t.xsk.validate().map_err(|e| err(line, format!("[Tuning]: {e}")))?;
    }
    Ok(())
}

fn subway_common_max_queues() -> u32 {
    subway_dataplane::MAX_QUEUES
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const KEY_B: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    const KEY_C: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/subway/site-a.conf"), text)
    }

    #[test]
    fn a_full_gateway_config() {
        let c = parse(&format!(
            "# site A\n[Interface]\nPrivateKey = {KEY_A}\nListenPort = 51820\nUplink = wan0\nAddress = 10.9.0.1/24\n\n\
             [Lan]\nInterface = lan0\nSubnets = 10.1.0.0/24, fd01::/64\n\n\
             [Peer]\nPublicKey = {KEY_B}\nEndpoint = 192.0.2.2:51820\nAllowedIPs = 10.2.0.0/24\nAllowedIPs = fd02::/64\nPersistentKeepalive = 25\n\n\
             [Tuning]\nQueues = 0-1\nCores = 0,1\nBatchSize = 32\nXskMode = copy\nXdpMode = generic\nBusyPoll = on\n"
        ))
        .unwrap();
        assert_eq!(c.name, "site-a");
        assert_eq!(c.interface.listen_port, Some(51820));
        assert_eq!(c.interface.uplink.as_ref().unwrap().0, "wan0");
        assert_eq!(c.lans[0].subnets.len(), 2);
        assert_eq!(c.peers[0].allowed_ips.len(), 2);
        assert_eq!(c.peers[0].persistent_keepalive, Some(25));
        assert_eq!(c.tuning.queues, Some(vec![0, 1]));
        assert_eq!(c.tuning.xsk.batch_size, 32);
        assert_eq!(c.tuning.xsk.bind, BindMode::Copy);
        assert_eq!(c.tuning.xdp_mode, XdpAttach::Generic);
        assert!(c.tuning.xsk.busy_poll);
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(c.warnings[0].contains(":6: Address"), "{:?}", c.warnings);
    }

    #[test]
    fn the_shipped_example_parses_once_keys_are_filled_in() {
        let text = include_str!("../dist/example.conf")
            .replace("REPLACE_WITH_wg_genkey_OUTPUT", KEY_A)
            .replace("REPLACE_WITH_THE_OTHER_SITE_PUBLIC_KEY", KEY_B);
        let c = parse(&text).unwrap();
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.metrics.map(|m| m.0.to_string()), Some("127.0.0.1:9586".into()));
        assert_eq!(c.tuning.cores, Some(vec![2, 3]));
    }

    #[test]
    fn routed_mode_needs_only_lans() {
        let c = parse("[Lan]\nInterface = lan0\n[Lan]\ninterface = lan1\nsubnets = 10.2.0.0/24\n").unwrap();
        assert_eq!(c.lans.len(), 2);
        assert!(c.peers.is_empty());
        assert!(c.lans[0].subnets.is_empty());
    }

    /// Deterministic mutation fuzzing of the parser (fixed seed and
    /// rounds): whatever the file holds, `parse` returns a config or an
    /// error naming a line of the file, and never panics.
    #[test]
    fn fuzz_the_config_parser() {
        let seed = include_str!("../dist/example.conf")
            .replace("REPLACE_WITH_wg_genkey_OUTPUT", KEY_A)
            .replace("REPLACE_WITH_THE_OTHER_SITE_PUBLIC_KEY", KEY_B)
            + "\n[Peer]\nPublicKey = "
            + KEY_A
            + "\nAllowedIPs = 10.9.0.0/16, fd09::/48\nVNet = red\n\n[Lan]\nInterface = lan1\nVNet = red\nSubnets = 192.168.1.0/24\n";
        let pieces = [
            "[Peer]",
            "[Lan]",
            "[Interface]",
            "[Tuning]",
            "[Metrics]",
            "=",
            " = ",
            "\n",
            ",",
            "/",
            "/33",
            "/129",
            "0.0.0.0/0",
            "::/0",
            "VNet = ",
            "Queues = 0-3",
            "Cores = 9999999999",
            "FailMode = ",
            "\u{0}",
            "é",
            "#",
            "AllowedIPs = ",
            "Endpoint = [::1]:0",
            "ListenPort = 70000",
            "BatchSize = 0",
            "RingSize = 3",
        ];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        };
        let lines = seed.lines().count() + 64;
        let (mut ok, mut refused) = (0, 0);
        for _ in 0..10_000 {
            let mut t: Vec<char> = seed.chars().collect();
            for _ in 0..1 + rnd(4) {
                let at = rnd(t.len() + 1);
                match rnd(4) {
                    0 if at < t.len() => {
                        t.remove(at);
                    }
                    1 => t.splice(at..at, pieces[rnd(pieces.len())].chars()).for_each(drop),
                    2 if at < t.len() => t.truncate(at),
                    _ => t.insert(at.min(t.len()), char::from(32 + rnd(95) as u8)),
                }
            }
            let text: String = t.into_iter().collect();
            match parse(&text) {
                Ok(_) => ok += 1,
                Err(e) => {
                    refused += 1;
                    assert!(e.line <= lines, "{e}");
                    assert!(e.to_string().starts_with("/etc/subway/site-a.conf"), "{e}");
                }
            }
        }
        assert!(ok > 50 && refused > 50, "{ok} parsed, {refused} refused");
    }

    #[test]
    fn fail_mode_is_closed_unless_open_is_asked_for() {
        let base = "[Interface]\nListenPort = 51820\n{}\n[Lan]\nInterface = lan0\n";
        assert!(!parse(&base.replace("{}", "")).unwrap().interface.fail_open);
        assert!(
            !parse(&base.replace("{}", "FailMode = Closed"))
                .unwrap()
                .interface
                .fail_open
        );
        assert!(
            parse(&base.replace("{}", "failmode = open"))
                .unwrap()
                .interface
                .fail_open
        );
        expect_err(
            &base.replace("{}", "FailMode = ajar"),
            3,
            "FailMode = ajar: expected `closed`",
        );
    }

    fn expect_err(text: &str, line: usize, needle: &str) {
        let e = parse(text).unwrap_err();
        assert_eq!(e.line, line, "{e}");
        assert!(e.to_string().contains(needle), "{e}");
        assert!(e.to_string().starts_with("/etc/subway/site-a.conf:"), "{e}");
    }

    #[test]
    fn errors_name_the_line_and_the_fix() {
        expect_err(
            "[Lan]\nInterface = lan0\nColour = blue\n",
            3,
            "unknown key `Colour` in [Lan]",
        );
        expect_err("[Lan]\nInterface = lan0\n[Bogus]\n", 3, "unknown section [Bogus]");
        expect_err(
            "[Interface]\nPrivateKey = notbase64!\n[Lan]\nInterface = lan0\n",
            2,
            "not valid base64",
        );
        expect_err(
            "[Interface]\nPrivateKey = AAAA\n[Lan]\nInterface = lan0\n",
            2,
            "3 bytes",
        );
        expect_err("[Lan]\nInterface = lan0\nSubnets = 10.0.0.0/33\n", 3, "not a prefix");
        expect_err("[Lan]\nSubnets = 10.0.0.0/24\n", 1, "has no Interface");
        expect_err("Interface = lan0\n", 1, "outside any section");
        expect_err("[Lan]\nInterface lan0\n", 2, "expected `Key = Value`");
        expect_err(
            "[Tuning]\nRingSize = 1000\n[Lan]\nInterface = lan0\n",
            2,
            "power of two",
        );
        expect_err(
            "[Tuning]\nXskMode = turbo\n[Lan]\nInterface = lan0\n",
            2,
            "auto, copy or zero-copy",
        );
        expect_err("[Interface]\nListenPort = 51820\n", 0, "no [Lan] section");
        expect_err(
            "[Lan]\nInterface = lan0\n[Lan]\nInterface = lan0\n",
            3,
            "already a [Lan] at line 1",
        );
        expect_err(
            "[Lan]\nInterface = lan0\nInterface = lan1\n",
            3,
            "given twice in this section (first at line 2)",
        );
        expect_err(
            "[Tuning]\nRingSize = 1000\nBatchSize = 32\n[Lan]\nInterface = lan0\n",
            2,
            "power of two",
        );
        expect_err(
            "[Tuning]\nBatchSize = 32\nRingSize = 16\n[Lan]\nInterface = lan0\n",
            3,
            "power of two",
        );
        expect_err("[Tuning]\nQueues = 0,0\n[Lan]\nInterface = lan0\n", 2, "twice");
        expect_err(
            "[Tuning]\nQueues = 64\n[Lan]\nInterface = lan0\n",
            2,
            "beyond the highest queue",
        );
    }

    #[test]
    fn a_prefix_claimed_by_two_peers_is_refused() {
        let text = format!(
            "[Interface]\nPrivateKey = {KEY_A}\nUplink = wan0\n[Lan]\nInterface = lan0\n\
             [Peer]\nPublicKey = {KEY_B}\nAllowedIPs = 10.2.0.0/24\n\
             [Peer]\nPublicKey = {KEY_C}\nAllowedIPs = 10.3.0.0/24, 10.2.0.0/24\n"
        );
        expect_err(&text, 11, "already claimed at line 8");
        // The same prefix in another VNET is fine.
        let ok = text.replace(
            "AllowedIPs = 10.3.0.0/24, 10.2.0.0/24",
            "AllowedIPs = 10.2.0.0/24\nVNet = blue",
        );
        parse(&ok).unwrap();
        // A LAN's subnet is an owner too.
        let lan = text.replace("Interface = lan0\n", "Interface = lan0\nSubnets = 10.3.0.0/24\n");
        expect_err(&lan, 12, "10.3.0.0/24 in VNET default is already claimed at line 4");
    }

    #[test]
    fn peers_need_a_private_key_and_unique_public_keys() {
        expect_err(
            &format!("[Interface]\nUplink = wan0\n[Lan]\nInterface = lan0\n[Peer]\nPublicKey = {KEY_B}\n"),
            1,
            "no PrivateKey",
        );
        expect_err(
            &format!("[Lan]\nInterface = lan0\n[Peer]\nPublicKey = {KEY_B}\n"),
            0,
            "no Uplink",
        );
        expect_err(
            &format!(
                "[Interface]\nPrivateKey = {KEY_A}\nUplink = wan0\n[Lan]\nInterface = lan0\n[Peer]\nPublicKey = {KEY_B}\n[Peer]\nPublicKey = {KEY_B}\n"
            ),
            8,
            "already the [Peer] at line 6",
        );
    }

    #[test]
    fn missing_interfaces_are_named() {
        let c = parse("[Lan]\nInterface = nosuchif0\n").unwrap();
        let e = c.check_interfaces().unwrap_err();
        assert_eq!(e.line, 1);
        assert!(e.msg.contains("nosuchif0 does not exist"), "{e}");
    }

    #[test]
    fn vnet_ids_are_dense_with_default_first() {
        let c = parse("[Lan]\nInterface = a\nVNet = red\n[Lan]\nInterface = b\n[Lan]\nInterface = c\nVNet = blue\n")
            .unwrap();
        assert_eq!(c.vnet_ids(), vec!["default", "red", "blue"]);
    }
}
