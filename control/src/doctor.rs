//! `subway doctor`: reads the box (the interfaces a config names, or every
//! one) and says what is wrong or worth changing, each finding with the
//! command that fixes it, and proposes a [Tuning] (which queues, which
//! cores) with its reasons. The reading is here ([`Facts::read`]); the
//! advice is a pure function of what was read ([`advise`], [`plan`]),
//! unit-tested from fixed inputs.

use serde::Serialize;
use std::collections::BTreeMap;

/// What an interface looks like.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Iface {
    pub name: String,
    /// "uplink", "lan", "uplink+lan", or "" (not in the config).
    pub role: String,
    pub exists: bool,
    pub driver: String,
    pub rx_queues: u32,
    /// `ethtool -l` maximum of combined (or RX) channels, if it says.
    pub max_channels: Option<u32>,
    /// Which `ethtool -L` takes: "combined" (most NICs) or "rx" (veth).
    pub channel_kind: String,
    pub mtu: u32,
    /// Offloads that are on: large-receive-offload, rx-gro-hw.
    pub offloads_on: Vec<String>,
    /// An XDP program already attached, and its name.
    pub xdp_prog: Option<String>,
    /// Each RX queue's interrupt, and the cores it may run on.
    pub irqs: Vec<(u32, Vec<usize>)>,
}

/// What the box looks like.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Facts {
    pub cores: usize,
    pub ifaces: Vec<Iface>,
    /// sysctl name and value.
    pub sysctls: BTreeMap<String, String>,
    /// The kernel's clock discipline: Some(true) synchronized (NTP/PTP).
    pub clock_synced: Option<bool>,
    /// Cores that take interrupts of devices other than these interfaces.
    pub busy_cores: Vec<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Info,
    Warning,
    Error,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub level: Level,
    pub what: String,
    pub fix: String,
}

/// A proposed [Tuning], with why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub queues: Vec<u32>,
    pub cores: Vec<usize>,
    /// `SourcePorts`: as many as the queues served (a far box like this
    /// one then spreads our datagrams over as many of its queues).
    pub source_ports: u16,
    pub why: Vec<String>,
}

/// Drivers with AF_XDP zero-copy in Linux 6.x.
const ZERO_COPY_DRIVERS: &[&str] = &[
    "i40e",
    "ice",
    "ixgbe",
    "igc",
    "igb",
    "mlx5_core",
    "stmmac",
    "bnxt_en",
    "idpf",
    "virtio_net",
];

fn f(level: Level, what: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        level,
        what: what.into(),
        fix: fix.into(),
    }
}

/// The findings for `facts`, errors first.
pub fn advise(facts: &Facts) -> Vec<Finding> {
    let mut out = Vec::new();
    for i in &facts.ifaces {
        let n = &i.name;
        if !i.exists {
            out.push(f(
                Level::Error,
                format!("{n}: no such interface"),
                "fix the config's Interface / Uplink, or create the interface",
            ));
            continue;
        }
        if i.driver == "veth" {
            out.push(f(
                Level::Info,
                format!("{n}: veth has no AF_XDP zero-copy: subway runs in copy mode"),
                "nothing to do for a test box; on a gateway use a NIC whose driver has zero-copy (ice, i40e, mlx5, ...)",
            ));
        } else if !ZERO_COPY_DRIVERS.contains(&i.driver.as_str()) {
            out.push(f(
                Level::Warning,
                format!(
                    "{n}: driver {} has no AF_XDP zero-copy that subway knows of: copy mode",
                    i.driver
                ),
                "expect copy-mode rates (see the README's benchmarks); XskMode = auto picks zero-copy where it exists",
            ));
        }
        if i.rx_queues <= 1 {
            let more = i.max_channels.filter(|m| *m > 1);
            out.push(f(
                Level::Warning,
                format!("{n}: one RX queue: one worker serves it, on one core"),
                match more {
                    Some(m) => format!(
                        "ethtool -L {n} {} {}",
                        if i.channel_kind.is_empty() {
                            "combined"
                        } else {
                            i.channel_kind.as_str()
                        },
                        m.min(facts.cores as u32)
                    ),
                    None => format!("the {} driver offers no more queues here", i.driver),
                },
            ));
        }
        for o in &i.offloads_on {
            out.push(f(
                Level::Error,
                format!("{n}: {o} is on: XDP cannot attach (or sees merged frames)"),
                format!(
                    "ethtool -K {n} {} off",
                    if o == "large-receive-offload" {
                        "lro"
                    } else {
                        o.as_str()
                    }
                ),
            ));
        }
        if let Some(p) = &i.xdp_prog {
            out.push(f(
                Level::Warning,
                format!("{n}: an XDP program ({p}) is attached: subway replaces it at start"),
                format!("check who put it there; ip link set dev {n} xdp off removes it"),
            ));
        }
        let others = i.irqs.iter().filter(|(_, cpus)| cpus.len() > 1).count();
        if others > 0 {
            out.push(f(
                Level::Info,
                format!("{n}: {others} queue interrupt(s) may run on several cores"),
                format!(
                    "pin each queue's IRQ to its worker's core: echo CORE > /proc/irq/IRQ/smp_affinity_list (IRQs: {})",
                    i.irqs
                        .iter()
                        .map(|(irq, _)| irq.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            ));
        }
    }
    // MTU: the tunnel adds 80 bytes (IPv6 outer) to what a LAN sends.
    let uplink = facts.ifaces.iter().find(|i| i.role.contains("uplink") && i.exists);
    for lan in facts.ifaces.iter().filter(|i| i.role.contains("lan") && i.exists) {
        if let Some(u) = uplink
            && lan.mtu + 80 > u.mtu
        {
            out.push(f(
                Level::Info,
                format!(
                    "{}: MTU {} + 80 (WireGuard over IPv6) exceeds the uplink {}'s {}: larger packets get \"fragmentation needed\" / MSS clamping",
                    lan.name, lan.mtu, u.name, u.mtu
                ),
                format!("nothing needed (subway clamps TCP MSS); or ip link set {} mtu {}", u.name, lan.mtu + 80),
            ));
        }
    }
    if facts.sysctls.get("net.ipv4.conf.all.rp_filter").map(String::as_str) == Some("1") {
        out.push(f(
            Level::Warning,
            "net.ipv4.conf.all.rp_filter = 1 (strict): the kernel may drop the slow path's packets",
            "sysctl -w net.ipv4.conf.all.rp_filter=2 (loose), or 0",
        ));
    }
    match facts.clock_synced {
        Some(false) => out.push(f(
            Level::Warning,
            "the clock is not synchronized: an HA pair's new active box may be refused (TAI64N)",
            "apt install chrony (or systemd-timesyncd) and let it sync",
        )),
        None => out.push(f(
            Level::Info,
            "clock synchronization unknown",
            "check chronyc tracking",
        )),
        _ => {}
    }
    out.sort_by_key(|x| std::cmp::Reverse(x.level));
    out
}

/// Which queues to serve and which cores to pin workers to: every RX queue
/// of the busiest-queued interface (up to one per core), each on the core
/// its interrupt lands on when that is known and free, else on cores that
/// take no other device's interrupts first.
pub fn plan(facts: &Facts) -> Plan {
    let mut why = Vec::new();
    let queues_of = facts
        .ifaces
        .iter()
        .filter(|i| i.exists)
        .map(|i| i.rx_queues.max(1))
        .max()
        .unwrap_or(1);
    let n = (queues_of as usize).min(facts.cores.max(1));
    if (queues_of as usize) > facts.cores {
        why.push(format!(
            "{queues_of} RX queues but {} cores: serve {n}, and set the NIC to {n} (ethtool -L IF combined {n})",
            facts.cores
        ));
    } else {
        why.push(format!("one worker per RX queue: {n} queue(s)"));
    }
    let mut free: Vec<usize> = (0..facts.cores).filter(|c| !facts.busy_cores.contains(c)).collect();
    let busy: Vec<usize> = facts.busy_cores.iter().copied().filter(|c| *c < facts.cores).collect();
    if !busy.is_empty() {
        why.push(format!(
            "cores {:?} take other devices' interrupts: workers go there last",
            busy
        ));
    }
    free.extend(busy);
    let mut cores = Vec::new();
    let irqs = facts
        .ifaces
        .iter()
        .filter(|i| i.exists)
        .max_by_key(|i| i.rx_queues)
        .map(|i| i.irqs.clone())
        .unwrap_or_default();
    for q in 0..n {
        // The core the queue's interrupt is pinned to (one core), if free.
        let pinned = irqs
            .get(q)
            .and_then(|(_, cpus)| (cpus.len() == 1).then(|| cpus[0]))
            .filter(|c| !cores.contains(c));
        let c = pinned
            .or_else(|| free.iter().copied().find(|c| !cores.contains(c)))
            .unwrap_or(q % facts.cores.max(1));
        if pinned.is_some() {
            why.push(format!("queue {q} on core {c}, where its interrupt is pinned"));
        }
        cores.push(c);
    }
    let source_ports = (n as u16).min(crate::config::MAX_SOURCE_PORTS);
    if source_ports > 1 {
        why.push(format!(
            "SourcePorts = {source_ports} (commented out: only where the peers reach this box without a NAT or a \
             stateful firewall that expects replies from ListenPort alone): one peer's datagrams leave from \
             {source_ports} UDP ports, so a far box like this one spreads them over {source_ports} queues; set it \
             there too, and let ListenPort .. ListenPort + {} through",
            source_ports - 1
        ));
    }
    Plan {
        queues: (0..n as u32).collect(),
        cores,
        source_ports,
        why,
    }
}

impl Plan {
    /// The [Tuning] lines.
    pub fn tuning(&self) -> String {
        let list = |v: &[String]| v.join(",");
        let mut t = format!(
            "[Tuning]\nQueues = {}\nCores = {}\n",
            list(&self.queues.iter().map(|q| q.to_string()).collect::<Vec<_>>()),
            list(&self.cores.iter().map(|c| c.to_string()).collect::<Vec<_>>())
        );
        if self.source_ports > 1 {
            t += &format!("# SourcePorts = {}\n", self.source_ports);
        }
        t
    }
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

fn cmd(args: &[&str]) -> String {
    std::process::Command::new(args[0])
        .args(&args[1..])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

impl Facts {
    /// Reads the box: `ifaces` as (name, role).
    pub fn read(ifaces: &[(String, String)]) -> Facts {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let interrupts = std::fs::read_to_string("/proc/interrupts").unwrap_or_default();
        let mut facts = Facts {
            cores,
            ..Default::default()
        };
        for key in [
            "net.ipv4.ip_forward",
            "net.ipv4.conf.all.rp_filter",
            "net.ipv6.conf.all.forwarding",
        ] {
            if let Some(v) = read(&format!("/proc/sys/{}", key.replace('.', "/"))) {
                facts.sysctls.insert(key.to_string(), v);
            }
        }
        for (name, role) in ifaces {
            let sys = format!("/sys/class/net/{name}");
            let exists = std::path::Path::new(&sys).exists();
            let mut i = Iface {
                name: name.clone(),
                role: role.clone(),
                exists,
                ..Default::default()
            };
            if exists {
                i.driver = cmd(&["ethtool", "-i", name])
                    .lines()
                    .find_map(|l| l.strip_prefix("driver: ").map(str::to_string))
                    .unwrap_or_default();
                i.rx_queues = std::fs::read_dir(format!("{sys}/queues"))
                    .map(|d| {
                        d.flatten()
                            .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                            .count() as u32
                    })
                    .unwrap_or(1);
                let l = cmd(&["ethtool", "-l", name]);
                let max_of = |kind: &str| -> Option<u32> {
                    l.split("Current hardware settings")
                        .next()
                        .unwrap_or("")
                        .lines()
                        .find(|x| x.starts_with(kind))
                        .and_then(|x| x.split_whitespace().nth(1)?.parse().ok())
                };
                (i.max_channels, i.channel_kind) = match (max_of("Combined:"), max_of("RX:")) {
                    (Some(c), _) => (Some(c), "combined".into()),
                    (None, Some(r)) => (Some(r), "rx".into()),
                    _ => (None, String::new()),
                };
                i.mtu = read(&format!("{sys}/mtu")).and_then(|m| m.parse().ok()).unwrap_or(1500);
                let k = cmd(&["ethtool", "-k", name]);
                for o in ["large-receive-offload", "rx-gro-hw"] {
                    if k.lines().any(|x| x.starts_with(&format!("{o}: on"))) {
                        i.offloads_on.push(o.to_string());
                    }
                }
                let link = cmd(&["ip", "-d", "link", "show", "dev", name]);
                if let Some(rest) = link.split("prog/xdp").nth(1) {
                    i.xdp_prog = Some(
                        rest.split_whitespace()
                            .find(|w| w.starts_with("name") || w.starts_with("id"))
                            .map(|w| w.to_string())
                            .unwrap_or_else(|| "attached".into()),
                    );
                }
                for line in interrupts.lines().filter(|x| x.contains(name.as_str())) {
                    if let Some(irq) = line.split(':').next().and_then(|x| x.trim().parse::<u32>().ok()) {
                        let cpus = read(&format!("/proc/irq/{irq}/smp_affinity_list"))
                            .map(|s| parse_cpu_list(&s))
                            .unwrap_or_default();
                        i.irqs.push((irq, cpus));
                    }
                }
            }
            facts.ifaces.push(i);
        }
        // Cores that take other devices' interrupts (counts moving on them).
        for line in interrupts.lines().skip(1) {
            if ifaces.iter().any(|(n, _)| line.contains(n.as_str())) || !line.contains("-") {
                continue;
            }
            let counts: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .take(cores)
                .filter_map(|x| x.parse().ok())
                .collect();
            if line.contains("eth") || line.contains("nvme") || line.contains("virtio") {
                for (c, n) in counts.iter().enumerate() {
                    if *n > 1000 && !facts.busy_cores.contains(&c) {
                        facts.busy_cores.push(c);
                    }
                }
            }
        }
        facts.busy_cores.sort();
        // SAFETY: ntp_adjtime with a zeroed timex and modes 0 only reads.
        let mut tx: libc::timex = unsafe { std::mem::zeroed() };
        let state = unsafe { libc::ntp_adjtime(&mut tx) };
        facts.clock_synced = match state {
            -1 => None,
            libc::TIME_ERROR => Some(false),
            _ => Some(tx.status & libc::STA_UNSYNC == 0),
        };
        facts
    }
}

fn parse_cpu_list(s: &str) -> Vec<usize> {
    let mut v = Vec::new();
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                    v.extend(a..=b);
                }
            }
            None => v.extend(part.parse::<usize>().ok()),
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn veth(name: &str, role: &str, queues: u32) -> Iface {
        Iface {
            name: name.into(),
            role: role.into(),
            exists: true,
            driver: "veth".into(),
            rx_queues: queues,
            max_channels: Some(queues),
            mtu: 1500,
            ..Default::default()
        }
    }

    #[test]
    fn a_veth_test_box_gets_exactly_its_findings() {
        let facts = Facts {
            cores: 2,
            ifaces: vec![veth("lan0", "lan", 1), veth("wan0", "uplink", 1)],
            sysctls: [("net.ipv4.conf.all.rp_filter".to_string(), "0".to_string())].into(),
            clock_synced: Some(true),
            busy_cores: vec![],
        };
        let got = advise(&facts);
        let whats: Vec<&str> = got.iter().map(|x| x.what.as_str()).collect();
        assert_eq!(
            got.iter().filter(|x| x.what.contains("no AF_XDP zero-copy")).count(),
            2,
            "{whats:?}"
        );
        assert_eq!(
            got.iter().filter(|x| x.what.contains("one RX queue")).count(),
            2,
            "{whats:?}"
        );
        assert!(got.iter().any(|x| x.what.contains("MTU 1500 + 80")), "{whats:?}");
        assert_eq!(got.len(), 5, "{whats:?}");
        assert!(got.iter().all(|x| x.level < Level::Error));
    }

    #[test]
    fn errors_come_first_with_their_fix() {
        let mut nic = veth("eth1", "uplink", 8);
        nic.driver = "r8169".into();
        nic.offloads_on = vec!["large-receive-offload".into()];
        nic.mtu = 1600;
        let missing = Iface {
            name: "eth9".into(),
            role: "lan".into(),
            ..Default::default()
        };
        let facts = Facts {
            cores: 4,
            ifaces: vec![nic, missing],
            sysctls: [("net.ipv4.conf.all.rp_filter".to_string(), "1".to_string())].into(),
            clock_synced: Some(false),
            busy_cores: vec![],
        };
        let got = advise(&facts);
        assert_eq!(got[0].level, Level::Error);
        let fix = |needle: &str| got.iter().find(|x| x.what.contains(needle)).map(|x| x.fix.clone());
        assert_eq!(fix("large-receive-offload").as_deref(), Some("ethtool -K eth1 lro off"));
        assert!(fix("no such interface").is_some());
        assert!(fix("r8169").is_some());
        assert!(fix("rp_filter").unwrap().contains("rp_filter=2"));
        assert!(fix("not synchronized").unwrap().contains("chrony"));
    }

    #[test]
    fn the_plan_serves_every_queue_on_its_interrupt_core_and_avoids_busy_cores() {
        let mut nic = veth("eth1", "uplink", 4);
        nic.irqs = vec![
            (40, vec![3]),
            (41, vec![2]),
            (42, vec![0, 1, 2, 3]),
            (43, vec![0, 1, 2, 3]),
        ];
        let facts = Facts {
            cores: 4,
            ifaces: vec![nic],
            busy_cores: vec![0],
            ..Default::default()
        };
        let p = plan(&facts);
        assert_eq!(p.queues, vec![0, 1, 2, 3]);
        assert_eq!(
            p.cores,
            vec![3, 2, 1, 0],
            "pinned IRQs kept, free cores next, the busy one last"
        );
        assert_eq!(
            p.tuning(),
            "[Tuning]\nQueues = 0,1,2,3\nCores = 3,2,1,0\n# SourcePorts = 4\n"
        );
        // More queues than cores: one per core.
        let facts = Facts {
            cores: 2,
            ifaces: vec![veth("eth1", "uplink", 8)],
            ..Default::default()
        };
        let p = plan(&facts);
        assert_eq!((p.queues.len(), p.cores.clone()), (2, vec![0, 1]));
        assert!(p.why[0].contains("ethtool -L"), "{:?}", p.why);
        assert!(p.tuning().ends_with("# SourcePorts = 2\n"), "{}", p.tuning());
        // One queue: nothing to spread over.
        let facts = Facts {
            cores: 2,
            ifaces: vec![veth("eth1", "uplink", 1)],
            ..Default::default()
        };
        assert!(!plan(&facts).tuning().contains("SourcePorts"));
    }

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0-2,5"), vec![0, 1, 2, 5]);
        assert_eq!(parse_cpu_list("3"), vec![3]);
    }
}
