//! Active/standby with keepalived: two boxes share one WireGuard identity
//! (same private key and peers), keepalived (VRRP) moves the LANs' virtual
//! address between them, and the box that holds it is the active one. The
//! standby runs warm (XDP, workers, FIB, sockets) but sends nothing to the
//! peers; when the address arrives it handshakes every peer at once, and
//! they roam to it by the ordinary WireGuard rules
//! ([`subway_dataplane::wg::device::Device::set_standby`]).
//!
//! The role follows the address, not a notify script: the kernel's address
//! events wake the control thread the moment keepalived adds or removes
//! it, and no script can be missed or run out of order.

use crate::config::HaSection;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::time::Instant;
use subway_dataplane::Dataplane;
use subway_dataplane::netlink::Netlink;

pub struct Ha {
    vips: Vec<IpAddr>,
    nl: Netlink,
    pub active: bool,
    since: Instant,
    since_unix: u64,
    why: String,
    changes: u64,
}

/// `subway show`'s view of the role.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleStatus {
    /// "active" or "standby".
    pub role: String,
    pub since_secs: u64,
    /// Unix time of the last change (or of the start).
    pub since_unix: u64,
    pub why: String,
    /// Changes of role since start.
    pub changes: u64,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Ha {
    /// The role at start: active if this box holds a virtual address now.
    pub fn new(section: &HaSection, dp: &Dataplane) -> std::io::Result<Ha> {
        let mut ha = Ha {
            vips: section.virtual_addresses.clone(),
            nl: Netlink::open()?,
            active: false,
            since: Instant::now(),
            since_unix: unix_now(),
            why: String::new(),
            changes: 0,
        };
        let (active, why) = ha.read(dp);
        ha.active = active;
        ha.why = why;
        tracing::info!(
            "HA: this box starts as {} ({})",
            if active { "ACTIVE" } else { "STANDBY" },
            ha.why
        );
        Ok(ha)
    }

    /// Whether this box holds one of the virtual addresses, and why.
    fn read(&mut self, dp: &Dataplane) -> (bool, String) {
        for p in dp.tables().ports.iter() {
            match self.nl.addresses(p.ifindex) {
                Ok(addrs) => {
                    if let Some(a) = addrs.iter().find(|a| self.vips.contains(&a.addr())) {
                        return (true, format!("holds the virtual address {} on {}", a.addr(), p.name));
                    }
                }
                Err(e) => tracing::warn!("HA: reading the addresses of {}: {e}", p.name),
            }
        }
        let list: Vec<String> = self.vips.iter().map(|v| v.to_string()).collect();
        (false, format!("does not hold the virtual address {}", list.join(", ")))
    }

    /// Re-reads the role after address events; `Some(active)` when it
    /// changed (logged once).
    pub fn update(&mut self, dp: &Dataplane) -> Option<bool> {
        let (active, why) = self.read(dp);
        if active == self.active {
            return None;
        }
        self.active = active;
        self.why = why;
        self.since = Instant::now();
        self.since_unix = unix_now();
        self.changes += 1;
        tracing::warn!(
            "HA: this box is now {} ({})",
            if active {
                "ACTIVE: handshaking every peer"
            } else {
                "STANDBY: sessions dropped, sending nothing"
            },
            self.why
        );
        Some(active)
    }

    /// When the current role began (the start, or the last change).
    pub fn since(&self) -> Instant {
        self.since
    }

    pub fn status(&self) -> RoleStatus {
        RoleStatus {
            role: if self.active { "active" } else { "standby" }.into(),
            since_secs: self.since.elapsed().as_secs(),
            since_unix: self.since_unix,
            why: self.why.clone(),
            changes: self.changes,
        }
    }
}
