//! subway's configuration file: a superset of wg-quick's format.
//!
//! ```text
//! [Interface]            PrivateKey, ListenPort, Uplink, FailMode (subway's)
//! [Lan]      (1 or more) Interface, Subnets, VNet
//! [Peer]     (0 or more) PublicKey, PresharedKey, Endpoint, AllowedIPs,
//!                        PersistentKeepalive, VNet
//! [Metrics]  (optional)  Listen
//! [Tuning]   (optional)  Queues, Cores, SourcePorts, BatchSize, RingSize, FrameSize,
//!                        XskMode, XdpMode, BusyPoll, NeedWakeup, IdleSpin
//! ```
//!
//! Keys and section names are case-insensitive, as in wg-quick. wg-quick
//! keys subway does not use are accepted with a warning. Every error names
//! the file and line, says what is wrong and what to do.
//!
//! - this file: the parsed types, loading a file, the check against the
//!   host (`check_interfaces`) and the VNET numbering (`vnet_ids`);
//! - `parse`: the file, line by line, into sections; keys given twice; the
//!   rules that span sections;
//! - `sections`: the keys of each section, one function per section;
//! - `values`: the value syntaxes (keys, numbers, booleans, ranges,
//!   prefixes, VNET names).

pub mod doc;
mod parse;
pub mod policy;
mod sections;
mod values;

#[cfg(test)]
mod tests;

use base64::Engine;
use ipnet::IpNet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use subway_dataplane::{XdpAttach, XskOptions};

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
    /// `Route = PREFIX via HOP [HOP...]`: prefixes behind routers on this
    /// LAN, with their line.
    pub routes: Vec<(IpNet, Vec<std::net::IpAddr>, usize)>,
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
    /// A member of a route group (`Priority`, `Probe`): its prefixes are
    /// shared with other peers of the VNET.
    pub group: Option<GroupMember>,
}

/// How a peer takes part in a route group: the same prefixes on several
/// [Peer]s of one VNET (a far site with two gateways of its own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupMember {
    /// Higher is preferred; equal priorities share the traffic (ECMP, each
    /// flow on one peer).
    pub priority: u8,
    pub priority_line: usize,
    /// An address behind the peer that answers ICMP echo, probed through
    /// its tunnel.
    pub probe: Option<(std::net::IpAddr, usize)>,
    pub probe_interval: std::time::Duration,
    /// Probes missed in a row before the peer is down.
    pub probe_misses: u32,
}

/// Defaults of a route group member's probing.
pub const PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);
pub const PROBE_MISSES: u32 = 2;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tuning {
    pub queues: Option<Vec<u32>>,
    pub cores: Option<Vec<usize>>,
    pub xsk: XskOptions,
    /// [Policy]'s flow table: MaxFlows and the FlowTimeout* keys.
    pub flows: subway_dataplane::policy::FlowLimits,
    pub xdp_mode: XdpAttach,
    /// `SourcePorts = N` and its line: the tunnel's datagrams leave from
    /// ListenPort .. ListenPort + N - 1, one port per inner flow, so that
    /// the receiver's RSS spreads one peer over N of its queues.
    pub source_ports: Option<AtLine<u16>>,
}

impl Tuning {
    /// `SourcePorts` (1 when not given).
    pub fn spread(&self) -> u16 {
        self.source_ports.map_or(1, |s| s.0)
    }
}

/// A setting and the line it was given on. Two are equal when their
/// values are: a setting that only moved in the file did not change (a
/// reload compares [Tuning] to decide whether it needs a restart).
#[derive(Clone, Copy, Debug)]
pub struct AtLine<T>(pub T, pub usize);

impl<T: PartialEq> PartialEq for AtLine<T> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl<T: Eq> Eq for AtLine<T> {}

/// The most ports `SourcePorts` may spread over (each is an XDP listen
/// entry per uplink address and a socket for the handshakes sent to it).
pub const MAX_SOURCE_PORTS: u16 = 32;

/// `[Export]`: subway keeps the default VNET's peer prefixes it can serve
/// (through a healthy peer) in a kernel routing table of their own, for a
/// routing daemon (BIRD) to announce; nothing in the main table changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSection {
    pub line: usize,
    pub table: u32,
    /// The routes' protocol number (`ip route ... proto N`).
    pub protocol: u8,
    /// On a clean stop: routes withdrawn first, then this long serving
    /// while the routers move away, then the stop.
    pub drain: std::time::Duration,
}

/// `[HA]`: this box is one of an active/standby pair that shares one
/// WireGuard identity; keepalived (VRRP) moves the LAN's virtual address
/// between them, and the box that holds it is the active one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HaSection {
    pub line: usize,
    /// The virtual addresses keepalived moves (`VirtualAddress`).
    pub virtual_addresses: Vec<std::net::IpAddr>,
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
    /// Active/standby with keepalived, if an [HA] section asks for it.
    pub ha: Option<HaSection>,
    /// The routing table subway keeps for a routing daemon, if [Export].
    pub export: Option<ExportSection>,
    /// [Policy] sections, at most one per VNET.
    pub policies: Vec<policy::PolicySection>,
    pub warnings: Vec<String>,
    /// VNET names a running instance already numbered (see `vnet_ids`).
    pub known_vnets: Vec<String>,
    /// The [Peer] sections as read from the file, for the next reload
    /// ([`Config::load_after`]); None for a config not read from a file.
    pub peer_texts: Option<std::sync::Arc<PeerTexts>>,
}

/// The [Peer] sections of the file a config was read from, by their text:
/// the next reload parses again only the sections whose text changed (a
/// file with 10,000 peers is 3 MB) and takes the others from the config's
/// `peers`, moved to their new lines. Sections whose Endpoint is a host
/// name are not kept (a reload resolves it again), nor those that gave a
/// warning (it is given again). A config changed otherwise than by reading
/// its file (`wg set`) has none: its `peers` no longer match the text.
#[derive(Default)]
pub struct PeerTexts {
    text: String,
    /// (hash of a kept section's text, its index in `kept`), sorted once
    /// all are kept ([`PeerTexts::sorted`]): 10,000 sections, no
    /// allocation each.
    by_hash: Vec<(u64, usize)>,
    /// Each kept section: its text after the header line (a range of
    /// `text`), the header's line, and its index in the config's `peers`.
    kept: Vec<(std::ops::Range<usize>, usize, usize)>,
}

impl fmt::Debug for PeerTexts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerTexts({} sections)", self.kept.len())
    }
}

impl PeerTexts {
    pub(crate) fn hash(body: &str) -> u64 {
        use std::hash::Hasher;
        let mut h = subway_dataplane::fxhash::FxHasher::default();
        h.write(body.as_bytes());
        h.finish()
    }

    /// The section of `peers` (the config these texts were read with)
    /// parsed from exactly `body` (the lines after its header; `hash`, its
    /// hash), moved to its header's line `now`.
    fn find(&self, peers: &[PeerSection], body: &str, hash: u64, now: usize) -> Option<PeerSection> {
        let from = self.by_hash.partition_point(|(h, _)| *h < hash);
        let (_, line, i) = self.by_hash[from..]
            .iter()
            .take_while(|(h, _)| *h == hash)
            .map(|(_, i)| &self.kept[*i])
            .find(|(r, _, _)| &self.text[r.clone()] == body)?;
        Some(peers.get(*i)?.moved(now as isize - *line as isize))
    }

    /// Keeps the section `peer` (an index in `peers`) parsed from `body`
    /// (a range of the text; `hash`, its hash if known) with its header at
    /// `line`.
    fn keep(&mut self, body: std::ops::Range<usize>, hash: Option<u64>, line: usize, peer: usize) {
        let h = hash.unwrap_or_else(|| Self::hash(&self.text[body.clone()]));
        self.by_hash.push((h, self.kept.len()));
        self.kept.push((body, line, peer));
    }

    /// Once every section is kept: ready for [`PeerTexts::find`].
    fn sorted(mut self) -> Self {
        self.by_hash.sort_unstable();
        self
    }
}

impl PeerSection {
    /// The same section `by` lines further down the file.
    fn moved(&self, by: isize) -> PeerSection {
        let at = |l: usize| l.saturating_add_signed(by);
        let mut p = self.clone();
        p.line = at(p.line);
        for (_, l) in &mut p.allowed_ips {
            *l = at(*l);
        }
        if let Some(g) = &mut p.group {
            g.priority_line = at(g.priority_line);
            if let Some((_, l)) = &mut g.probe {
                *l = at(*l);
            }
        }
        p
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_after(path, None)
    }

    /// [`Config::load`] for a reload of `prev`: the [Peer] sections whose
    /// text is unchanged are taken from it, not parsed again.
    pub fn load_after(path: &Path, prev: Option<&Config>) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: 0,
            msg: format!("cannot read the config file: {e}"),
        })?;
        let mut cfg = Self::parse_with(path, text, prev)?;
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

    fn err(&self, line: usize, msg: String) -> ConfigError {
        ConfigError {
            file: self.path.clone(),
            line,
            msg,
        }
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
