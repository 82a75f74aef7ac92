//! [Export]: the contract with a routing daemon. subway keeps every
//! default-VNET peer prefix it can serve now, through a healthy peer, in a
//! kernel routing table of its own (`Table`, `Protocol`), as a route into
//! its slow-path TUN; a daemon such as BIRD imports that table and
//! announces the prefixes (BGP, with this box as next hop). Nothing in the
//! main table changes, and subway has no routing protocol of its own.
//!
//! A peer is healthy when its route group's probes say so, or, outside a
//! group, while it has a live session. A route goes within a round of its
//! peer going down; all go on `subway drain` and first thing on a clean
//! stop. If the process dies, the kernel deletes the TUN and every route
//! through it with it: a crash withdraws too.

use crate::config::{Config, ExportSection};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

pub struct Exporter {
    table: u32,
    protocol: u8,
    tun: String,
    installed: BTreeSet<IpNet>,
    /// `subway drain`: nothing is exported until undone.
    pub draining: bool,
    /// Routes added and withdrawn since start.
    changes: u64,
}

/// `subway show`'s view of the exported table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportStatus {
    pub table: u32,
    pub protocol: u8,
    pub routes: Vec<String>,
    pub draining: bool,
    pub changes: u64,
}

impl Exporter {
    /// Clears what a previous run left in the table (a run that died
    /// lost its TUN and so its routes; this is for other leftovers).
    pub fn new(e: &ExportSection, tun: &str) -> Exporter {
        let (table, proto) = (e.table.to_string(), e.protocol.to_string());
        for family in ["-4", "-6"] {
            let _ = std::process::Command::new("ip")
                .args([family, "route", "flush", "table", &table, "proto", &proto])
                .output();
        }
        tracing::info!(
            "export: the peer prefixes this box can serve go to table {} (proto {}) for a routing daemon",
            e.table,
            e.protocol
        );
        Exporter {
            table: e.table,
            protocol: e.protocol,
            tun: tun.to_string(),
            installed: BTreeSet::new(),
            draining: false,
            changes: 0,
        }
    }

    /// The default VNET's peer prefixes whose peer is healthy now.
    pub fn wanted(cfg: &Config, healthy: impl Fn(u32) -> bool) -> BTreeSet<IpNet> {
        cfg.peers
            .iter()
            .filter(|p| p.vnet == "default" && healthy(p.id))
            .flat_map(|p| p.allowed_ips.iter().map(|(n, _)| n.trunc()))
            .collect()
    }

    /// Makes the table hold `wanted` (nothing while draining): adds what
    /// is new, withdraws what is gone, in one `ip -batch` each.
    pub fn sync(&mut self, wanted: &BTreeSet<IpNet>) {
        let empty = BTreeSet::new();
        let wanted = if self.draining { &empty } else { wanted };
        if *wanted == self.installed {
            return;
        }
        let add: Vec<IpNet> = wanted.difference(&self.installed).copied().collect();
        let del: Vec<IpNet> = self.installed.difference(wanted).copied().collect();
        let line = |op: &str, n: &IpNet| {
            format!(
                "route {op} {n} dev {} table {} proto {}\n",
                self.tun, self.table, self.protocol
            )
        };
        let script: String = del.iter().map(|n| line("del", n)).collect();
        if let Err(e) = subway_dataplane::host::ip_batch(&script, true) {
            tracing::warn!("export: withdrawing from table {}: {e}", self.table);
        }
        let script: String = add.iter().map(|n| line("replace", n)).collect();
        match subway_dataplane::host::ip_batch(&script, true) {
            Ok(()) => {}
            Err(e) => tracing::warn!("export: adding to table {}: {e}", self.table),
        }
        if !add.is_empty() || !del.is_empty() {
            tracing::info!(added = ?add, withdrawn = ?del, "export: table {} changed", self.table);
        }
        self.changes += (add.len() + del.len()) as u64;
        self.installed = wanted.clone();
    }

    /// Withdraws everything (a drain, a clean stop). Returns whether
    /// anything was exported.
    pub fn withdraw_all(&mut self) -> bool {
        let had = !self.installed.is_empty();
        self.sync(&BTreeSet::new());
        had
    }

    pub fn status(&self) -> ExportStatus {
        ExportStatus {
            table: self.table,
            protocol: self.protocol,
            routes: self.installed.iter().map(|n| n.to_string()).collect(),
            draining: self.draining,
            changes: self.changes,
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.withdraw_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_healthy_peers_prefixes_of_the_default_vnet_are_wanted() {
        let text = "[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\nListenPort = 51820\nUplink = wan0\n\n\
                    [Lan]\nInterface = lan0\n\n[Lan]\nInterface = lan1\nVNet = red\n\n\
                    [Peer]\nPublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\nAllowedIPs = 10.2.0.0/24, fd02::/64\n\n\
                    [Peer]\nPublicKey = TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=\nAllowedIPs = 10.3.0.0/24\n\n\
                    [Peer]\nPublicKey = hGd6c8oU3BpKKdLZz5Wh8ZvGbIPC5DJKJfnCzqNoA3Y=\nAllowedIPs = 10.4.0.0/24\nVNet = red\n";
        let cfg = Config::parse(std::path::Path::new("/etc/subway/a.conf"), text).unwrap();
        let w = Exporter::wanted(&cfg, |id| id != 1);
        let got: Vec<String> = w.iter().map(|n| n.to_string()).collect();
        assert_eq!(
            got,
            vec!["10.2.0.0/24", "fd02::/64"],
            "peer 1 is down, peer 2 is in VNET red"
        );
    }
}
