//! What a running instance reports about itself, as one typed value built
//! once per request: `subway show --json` serializes it, `subway show`
//! prints it as text (the `Display` impl below), and the Prometheus
//! endpoint renders it (metrics.rs). The three cannot disagree, and a
//! field renamed here is renamed for all of them.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Instant;
use subway_dataplane::Dataplane;
use subway_dataplane::stats::Counter;
use subway_dataplane::xsk::XskStats;

/// Counters by name.
pub type Counters = BTreeMap<String, u64>;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub name: String,
    pub pid: u32,
    /// "gateway" (WireGuard peers) or "routed".
    pub mode: String,
    pub listen_port: Option<u16>,
    /// `SourcePorts`: the tunnel sends from (and receives on) this many
    /// ports from `listen_port` on.
    #[serde(default)]
    pub source_ports: u16,
    pub peers: Vec<PeerStatus>,
    /// The control thread's events: handshakes, cookies, refusals.
    pub control: Counters,
    /// Rounds of the control thread's loop since start (it sleeps until
    /// something arrives or a timer is due).
    #[serde(default)]
    pub control_wakeups: u64,
    pub uptime_secs: u64,
    /// The slow-path TUN's name.
    pub slow_path: String,
    pub interfaces: Vec<InterfaceStatus>,
    pub routes: Vec<RouteStatus>,
    /// Entries in the workers' neighbour mirror.
    pub neighbours: usize,
    pub workers: Vec<WorkerStatus>,
    /// Every worker's counters summed.
    pub totals: Counters,
    /// The kernel's AF_XDP socket counters summed.
    pub xsk: Counters,
    /// The XDP program's decisions.
    pub xdp: Counters,
    pub reloads: ReloadStatus,
    /// Non-default VNET packets the control thread finished or dropped.
    pub vnet_slow_path: Counters,
    #[serde(default)]
    pub local_refused: LocalRefused,
    /// Active/standby ([HA]), if configured.
    #[serde(default)]
    pub ha: Option<crate::ha::RoleStatus>,
    /// The routing table kept for a routing daemon ([Export]).
    #[serde(default)]
    pub export: Option<crate::export::ExportStatus>,
    /// [Policy]: each VNET's rules with their counters.
    #[serde(default)]
    pub policies: Vec<PolicyStatus>,
    /// [Policy]'s flow table.
    #[serde(default)]
    pub flows: Option<FlowStatus>,
    /// What following the kernel's route changes cost.
    #[serde(default)]
    pub kernel_routes: KernelRoutesStatus,
}

/// The control thread's work for the kernel's route changes: a change
/// costs what it touches (see `RouteNews`), not work per route or per peer.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct KernelRoutesStatus {
    /// FIB rebuilds that followed a change of a route it is built from
    /// (a LAN address, a main-table route inside a LAN's prefixes).
    pub fib_rebuilds: u64,
    /// Routes to peers' endpoints looked up in the kernel (once per
    /// endpoint, again only when a changed route covers it).
    pub endpoint_lookups: u64,
}

/// A VNET's policy and what it decided.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PolicyStatus {
    pub vnet: String,
    pub default: String,
    pub rules: Vec<RuleStatus>,
    /// Packets the default action decided.
    pub default_packets: u64,
    pub default_bytes: u64,
    /// Packets passed as part of a known flow (or ICMP errors about one).
    pub established: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RuleStatus {
    /// "line N: allow ...", as written in the config.
    pub rule: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FlowStatus {
    /// Flows alive now.
    pub flows: u64,
    /// Slots (MaxFlows, rounded up to a power of two).
    pub capacity: u64,
    pub inserted: u64,
    /// Flows pushed out before their time because the table was full
    /// where they hashed.
    pub evicted: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PeerStatus {
    pub public_key: String,
    pub id: usize,
    pub vnet: String,
    pub preshared_key: bool,
    pub persistent_keepalive: Option<u16>,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    pub latest_handshake_secs_ago: Option<u64>,
    /// Our receiver index of the session the workers send on.
    pub session: Option<u32>,
    pub session_initiator: Option<bool>,
    pub handshakes: u64,
    /// Whether the workers can send to the peer (session and path known).
    pub fast_path: bool,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// A route group member's priority.
    #[serde(default)]
    pub priority: Option<u8>,
    /// A route group member's health, from its probes.
    #[serde(default)]
    pub probe: Option<crate::probe::ProbeStatus>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    pub ifindex: u32,
    pub mac: String,
    /// None: the uplink only, in no VNET.
    pub vnet: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RouteStatus {
    pub vnet: Option<String>,
    pub prefix: String,
    pub target: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub id: usize,
    pub queue: u32,
    pub core: Option<usize>,
    /// "copy" or "zero-copy".
    pub mode: String,
    pub xdp_mode: String,
    pub interfaces: Vec<String>,
    pub counters: Counters,
    pub rx_pps: f64,
    pub tx_pps: f64,
    /// The kernel's counters per socket (interface name).
    pub xsk: BTreeMap<String, Counters>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReloadStatus {
    pub ok: u64,
    pub failed: u64,
    pub last_error: Option<String>,
    pub last_changes: Option<serde_json::Value>,
}

/// Local clients the control and UAPI sockets closed on, by reason.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LocalRefused {
    pub control: crate::local::Refusals,
    pub uapi: Option<crate::local::Refusals>,
}

/// Per-worker packet rates over the last second or so.
#[derive(Default)]
pub struct Rates {
    at: Option<Instant>,
    last: Vec<(u64, u64)>,
    pps: Vec<(f64, f64)>,
}

impl Rates {
    /// Takes a sample at most once a second.
    pub fn sample(&mut self, dp: &Dataplane) {
        let now = Instant::now();
        if self.at.is_some_and(|t| now.duration_since(t).as_secs_f64() < 1.0) {
            return;
        }
        let cur: Vec<(u64, u64)> = dp
            .workers()
            .iter()
            .map(|w| (w.stats.get(Counter::RxPackets), w.stats.get(Counter::TxPackets)))
            .collect();
        if let Some(t) = self.at {
            let dt = now.duration_since(t).as_secs_f64();
            self.pps = cur
                .iter()
                .zip(&self.last)
                .map(|(c, l)| ((c.0 - l.0) as f64 / dt, (c.1 - l.1) as f64 / dt))
                .collect();
        }
        self.at = Some(now);
        self.last = cur;
    }
}

/// Outcomes of live changes (reload, SIGHUP, `wg set`).
#[derive(Default)]
pub struct Reloads(ReloadStatus);

impl Reloads {
    pub fn note(&mut self, how: &str, r: &anyhow::Result<serde_json::Value>) {
        match r {
            Ok(v) => {
                self.0.ok += 1;
                self.0.last_changes = Some(v.clone());
                tracing::info!(changes = %v, "{how}: applied");
            }
            Err(e) => {
                self.0.failed += 1;
                self.0.last_error = Some(format!("{e:#}"));
                tracing::error!("{how}: {e:#}");
            }
        }
    }
}

fn named(values: &[u64]) -> Counters {
    Counter::ALL
        .iter()
        .map(|c| (c.name().to_string(), values[*c as usize]))
        .collect()
}

fn xsk_counters(st: &XskStats) -> Counters {
    XskStats::NAMES
        .iter()
        .zip(st.values())
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

/// The dataplane's half of the status (workers, tables, XDP); the
/// daemon fills in peers, control events and its own bookkeeping.
pub fn dataplane_status(dp: &Dataplane, vnet_names: &[String], rates: &Rates, reloads: &Reloads) -> Status {
    let mut totals = vec![0u64; Counter::COUNT];
    let mut xsk_totals = XskStats::default();
    let workers = dp
        .workers()
        .iter()
        .map(|w| {
            let snap = w.stats.snapshot();
            for (t, v) in totals.iter_mut().zip(snap.iter()) {
                *t += v;
            }
            let xsk = w
                .xsk_stats()
                .into_iter()
                .map(|(ifname, st)| {
                    xsk_totals = xsk_totals.plus(&st);
                    (ifname, xsk_counters(&st))
                })
                .collect();
            let pps = rates.pps.get(w.info.id).copied().unwrap_or_default();
            WorkerStatus {
                id: w.info.id,
                queue: w.info.queue,
                core: w.info.core,
                mode: if w.info.zero_copy { "zero-copy" } else { "copy" }.into(),
                xdp_mode: w.xdp_mode.clone(),
                interfaces: w.info.ports.clone(),
                counters: named(&snap),
                rx_pps: pps.0.round(),
                tx_pps: pps.1.round(),
                xsk,
            }
        })
        .collect();
    let vnet = |id: u32| vnet_names.get(id as usize).cloned();
    let t = dp.tables();
    Status {
        pid: std::process::id(),
        slow_path: dp.slow_path_name().to_string(),
        interfaces: t
            .ports
            .iter()
            .map(|p| InterfaceStatus {
                name: p.name.clone(),
                ifindex: p.ifindex,
                mac: p.mac.to_string(),
                vnet: vnet(p.vnet),
            })
            .collect(),
        routes: t
            .fib
            .routes()
            .iter()
            .map(|r| RouteStatus {
                vnet: vnet(r.vnet),
                prefix: r.prefix.to_string(),
                target: format!("{:?}", r.target),
            })
            .collect(),
        neighbours: t.neigh.len(),
        workers,
        totals: named(&totals),
        xsk: xsk_counters(&xsk_totals),
        xdp: dp
            .xdp_counters()
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        reloads: reloads.0.clone(),
        vnet_slow_path: dp.punt_stats().named().map(|(k, v)| (k.to_string(), v)).collect(),
        policies: policy_status(&t.policies, &vnet),
        flows: t.policies.flows.as_ref().map(|f| {
            let s = f.stats(subway_dataplane::wg::Now::system().mono.as_secs() as u32);
            FlowStatus {
                flows: s.flows,
                capacity: s.capacity,
                inserted: s.inserted,
                evicted: s.evicted,
            }
        }),
        kernel_routes: {
            let w = dp.kernel_route_work();
            KernelRoutesStatus {
                fib_rebuilds: w.fib_rebuilds,
                endpoint_lookups: w.endpoint_lookups,
            }
        },
        ..Status::default()
    }
}

fn policy_status(p: &subway_dataplane::policy::Policies, vnet: &dyn Fn(u32) -> Option<String>) -> Vec<PolicyStatus> {
    use std::sync::atomic::Ordering::Relaxed;
    p.by_vnet
        .iter()
        .flatten()
        .map(|pol| {
            let n = pol.config.rules.len();
            PolicyStatus {
                vnet: vnet(pol.config.vnet).unwrap_or_default(),
                default: format!("{:?}", pol.config.default).to_lowercase(),
                rules: pol
                    .config
                    .rules
                    .iter()
                    .zip(pol.counts.iter())
                    .map(|(r, c)| RuleStatus {
                        rule: format!("line {}: {}", r.line, r.text),
                        packets: c.packets.load(Relaxed),
                        bytes: c.bytes.load(Relaxed),
                    })
                    .collect(),
                default_packets: pol.counts[n].packets.load(Relaxed),
                default_bytes: pol.counts[n].bytes.load(Relaxed),
                established: pol.established.load(Relaxed),
            }
        })
        .collect()
}

/// `k=v` for the counters above zero that `keep` keeps.
fn nonzero(c: &Counters, keep: impl Fn(&str) -> bool) -> Vec<String> {
    c.iter()
        .filter(|(k, v)| keep(k) && **v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect()
}

fn or(list: Vec<String>, empty: &str) -> String {
    if list.is_empty() { empty.into() } else { list.join(" ") }
}

/// `subway show`, as text.
impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "instance {} (pid {}, {} mode, up {}s), slow path {}",
            self.name, self.pid, self.mode, self.uptime_secs, self.slow_path
        )?;
        if let Some(e) = &self.export {
            writeln!(
                f,
                "  export: table {} proto {}: {}{}",
                e.table,
                e.protocol,
                if e.routes.is_empty() {
                    "nothing".to_string()
                } else {
                    e.routes.join(", ")
                },
                if e.draining { " (drained)" } else { "" }
            )?;
        }
        if let Some(r) = &self.ha {
            writeln!(
                f,
                "  role: {} for {}s ({}; {} change(s) since start)",
                r.role.to_uppercase(),
                r.since_secs,
                r.why,
                r.changes
            )?;
        }
        for p in &self.policies {
            writeln!(
                f,
                "  policy VNET {}: default {} ({} packets / {} B), {} packets of known flows",
                p.vnet, p.default, p.default_packets, p.default_bytes, p.established
            )?;
            for r in &p.rules {
                writeln!(f, "    {:>10} pkts {:>12} B  {}", r.packets, r.bytes, r.rule)?;
            }
        }
        if let Some(fl) = &self.flows {
            writeln!(
                f,
                "  flows: {} of {} slots, {} inserted, {} evicted",
                fl.flows, fl.capacity, fl.inserted, fl.evicted
            )?;
        }
        let opt = |v: Option<usize>| v.map_or("null".to_string(), |c| c.to_string());
        for w in &self.workers {
            let c = |k: &str| w.counters.get(k).copied().unwrap_or(0);
            writeln!(
                f,
                "  worker {} queue {} core {} {} XDP {}: rx {} pkts / {} B, tx {} pkts / {} B, batches {}, now {} / {} pps",
                w.id,
                w.queue,
                opt(w.core),
                w.mode,
                w.xdp_mode,
                c("rx_packets"),
                c("rx_bytes"),
                c("tx_packets"),
                c("tx_bytes"),
                c("rx_batches"),
                w.rx_pps,
                w.tx_pps
            )?;
        }
        if let Some(port) = self.listen_port {
            let ports = subway_dataplane::config::tunnel_ports(port, self.source_ports);
            if ports.end() > ports.start() {
                writeln!(
                    f,
                    "  listening on UDP {}-{} (sending from one per flow)",
                    ports.start(),
                    ports.end()
                )?;
            } else {
                writeln!(f, "  listening on UDP {port}")?;
            }
        }
        for p in &self.peers {
            writeln!(
                f,
                "  peer {} (VNET {})\n    endpoint {}, allowed ips {}\n    latest handshake {}, handshakes {}, fast path {}\n    transfer: {} packets / {} B received, {} packets / {} B sent",
                p.public_key,
                p.vnet,
                p.endpoint.as_deref().unwrap_or("(none)"),
                p.allowed_ips.join(", "),
                p.latest_handshake_secs_ago
                    .map_or("never".to_string(), |s| format!("{s} s ago")),
                p.handshakes,
                p.fast_path,
                p.rx_packets,
                p.rx_bytes,
                p.tx_packets,
                p.tx_bytes,
            )?;
            if let Some(pr) = &p.probe {
                writeln!(
                    f,
                    "    route group: priority {}, {} ({}), probe {} every {} ms, rtt {}, {} change(s)",
                    p.priority.unwrap_or(0),
                    if pr.up { "UP" } else { "DOWN" },
                    pr.why,
                    pr.target,
                    pr.interval_ms,
                    pr.rtt_ms.map_or("-".to_string(), |r| format!("{r:.1} ms")),
                    pr.changes
                )?;
            }
        }
        // Every other non-zero counter of the workers: what the fast path did.
        writeln!(
            f,
            "  fast path: {}",
            or(
                nonzero(&self.totals, |k| !k.starts_with("drop_") && !k.starts_with("slow_")),
                "idle"
            )
        )?;
        writeln!(
            f,
            "  drops: {}",
            or(nonzero(&self.totals, |k| k.starts_with("drop_")), "none")
        )?;
        writeln!(
            f,
            "  to kernel (slow path): {}",
            or(nonzero(&self.totals, |k| k.starts_with("slow_")), "none")
        )?;
        writeln!(f, "  xdp: {}", nonzero(&self.xdp, |_| true).join(" "))?;
        writeln!(
            f,
            "  AF_XDP sockets (kernel): {}",
            or(nonzero(&self.xsk, |_| true), "no drops")
        )?;
        // The control thread's own counters: handshakes in and out, cookie
        // replies, rate limiting and refusals by reason (a handshake flood
        // shows here, not among the workers' drops).
        writeln!(f, "  control thread: {}", or(nonzero(&self.control, |_| true), "idle"))?;
        let mut refused = Vec::new();
        for (socket, r) in [
            ("control", Some(self.local_refused.control)),
            ("uapi", self.local_refused.uapi),
        ] {
            if let Some(r) = r {
                refused.extend(
                    r.named()
                        .into_iter()
                        .filter(|(_, n)| *n > 0)
                        .map(|(k, n)| format!("{socket}.{k}={n}")),
                );
            }
        }
        if !refused.is_empty() {
            writeln!(f, "  local clients closed: {}", refused.join(" "))?;
        }
        let vnet_slow = nonzero(&self.vnet_slow_path, |_| true);
        if !vnet_slow.is_empty() {
            writeln!(f, "  non-default VNETs, control thread: {}", vnet_slow.join(" "))?;
        }
        let r = &self.reloads;
        if r.ok + r.failed > 0 {
            writeln!(
                f,
                "  live changes: {} applied, {} refused{}",
                r.ok,
                r.failed,
                r.last_error
                    .as_deref()
                    .map(|e| format!(" (last refusal: {e})"))
                    .unwrap_or_default()
            )?;
        }
        writeln!(f, "  interfaces:")?;
        for i in &self.interfaces {
            writeln!(
                f,
                "    {} ({}) VNET {}",
                i.name,
                i.mac,
                i.vnet.as_deref().unwrap_or("uplink only")
            )?;
        }
        writeln!(f, "  routes:")?;
        for r in &self.routes {
            writeln!(
                f,
                "    [{}] {} -> {}",
                r.vnet.as_deref().unwrap_or("?"),
                r.prefix,
                r.target
            )?;
        }
        Ok(())
    }
}
