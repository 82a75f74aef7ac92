//! Per-worker counters. Each worker owns one cache-line-aligned block and
//! is its only writer (plain load + store, no locked instructions); the
//! control thread reads them for `subway show` and metrics. Workers add to
//! a local [`Tally`] per packet and flush it once per batch.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
pub use subway_common::NamedCounter;

subway_common::named_counters! {
    /// Every counter a worker keeps.
    #[repr(usize)]
    pub enum Counter {
        RxPackets = "rx_packets",
        RxBytes = "rx_bytes",
        TxPackets = "tx_packets",
        TxBytes = "tx_bytes",
        /// RX batches that held at least one frame.
        RxBatches = "rx_batches",
        /// Frames forwarded out of a LAN port by the fast path.
        ForwardedV4 = "forwarded_v4",
        ForwardedV6 = "forwarded_v6",
        /// TX wakeup syscalls (sendto) issued.
        TxWakeups = "tx_wakeups",
        /// poll() calls while idle.
        IdlePolls = "idle_polls",
        /// Handed to the kernel through the slow-path TUN, by reason.
        SlowNeighUnknown = "slow_neigh_unknown",
        SlowTtlExpired = "slow_ttl_expired",
        SlowNoRoute = "slow_no_route",
        SlowVlan = "slow_vlan",
        SlowTooBig = "slow_too_big",
        SlowLocal = "slow_local",
        /// Dropped, by reason.
        DropEthTruncated = "drop_eth_truncated",
        DropNotIp = "drop_not_ip",
        DropIpv4Malformed = "drop_ipv4_malformed",
        DropIpv4BadChecksum = "drop_ipv4_bad_checksum",
        DropIpv6Malformed = "drop_ipv6_malformed",
        DropTxRingFull = "drop_tx_ring_full",
        DropSlowPathFailed = "drop_slow_path_failed",
        DropNoTunnel = "drop_no_tunnel",
        /// Tunnel: frames sealed and sent to a peer, and opened from one.
        TunnelTx = "tunnel_tx",
        TunnelRx = "tunnel_rx",
        RxKeepalives = "rx_keepalives",
        /// Tunnel: no session or path yet, handed to the control thread via the kernel.
        SlowNoSession = "slow_no_session",
        DropOuterMalformed = "drop_outer_malformed",
        DropWgNotData = "drop_wg_not_data",
        DropWgUnknownIndex = "drop_wg_unknown_index",
        DropWgDecryptFailed = "drop_wg_decrypt_failed",
        DropWgReplayed = "drop_wg_replayed",
        DropWgExpired = "drop_wg_expired",
        /// Cryptokey routing: the inner source is not in the peer's AllowedIPs.
        DropNotAllowed = "drop_not_allowed",
        DropInnerMalformed = "drop_inner_malformed",
        DropTooBigForTunnel = "drop_too_big_for_tunnel",
        /// A packet of a non-default VNET needed the kernel (TTL expiring, too
        /// big for the next link, addressed to the gateway, no route): the
        /// kernel's single routing table must never see another VNET's packets.
        DropVnetNoKernel = "drop_vnet_no_kernel",
        /// The queue to the control thread (non-default VNETs) was full.
        DropPuntQueueFull = "drop_punt_queue_full",
        /// Beyond the slow path's budget for its VNET (see slowpath.rs).
        DropSlowPathLimited = "drop_slow_path_limited",
        /// For the broadcast address of a LAN subnet (a directed broadcast: a
        /// router does not flood a LAN for a remote sender).
        DropDirectedBroadcast = "drop_directed_broadcast",
        /// Refused by a [Policy] rule or a VNET's default deny.
        DropPolicy = "drop_policy",
        /// TCP SYNs whose MSS was lowered to fit the tunnel.
        MssClamped = "mss_clamped",
    }
}

impl Counter {
    pub fn is_drop(self) -> bool {
        self.name().starts_with("drop_")
    }
    pub fn is_slow_path(self) -> bool {
        self.name().starts_with("slow_")
    }
}

/// Counts of one set of named counters kept by one thread (the control
/// thread's punt server and events), indexed by the counter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counts<C> {
    values: Vec<u64>,
    _set: std::marker::PhantomData<C>,
}

impl<C: NamedCounter> Default for Counts<C> {
    fn default() -> Self {
        Counts {
            values: vec![0; C::ALL.len()],
            _set: std::marker::PhantomData,
        }
    }
}

impl<C: NamedCounter> Counts<C> {
    pub fn inc(&mut self, c: C) {
        self.values[c.index()] += 1;
    }
    pub fn get(&self, c: C) -> u64 {
        self.values[c.index()]
    }
    /// Every counter with its name, in declaration order.
    pub fn named(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        C::ALL.iter().map(|c| (c.name(), self.get(*c)))
    }
}

/// A worker's published counters.
#[repr(align(64))]
pub struct WorkerStats {
    values: [AtomicU64; Counter::COUNT],
    /// Turns of the worker's loop: it moves at least every 50 ms (the
    /// idle poll's bound) while the worker is alive and not wedged.
    heartbeat: AtomicU64,
}

impl Default for WorkerStats {
    fn default() -> Self {
        WorkerStats {
            values: std::array::from_fn(|_| AtomicU64::new(0)),
            heartbeat: AtomicU64::new(0),
        }
    }
}

impl WorkerStats {
    /// Publishes the loop's turn count (the owning worker, once a turn).
    #[inline(always)]
    pub fn beat(&self, turns: u64) {
        self.heartbeat.store(turns, Relaxed);
    }
    /// The last published turn count (for the control thread's liveness check).
    pub fn heartbeat(&self) -> u64 {
        self.heartbeat.load(Relaxed)
    }
    pub fn get(&self, c: Counter) -> u64 {
        self.values[c as usize].load(Relaxed)
    }
    /// Adds a tally. Only the owning worker may call this.
    pub fn flush(&self, t: &mut Tally) {
        for (i, v) in t.0.iter_mut().enumerate() {
            if *v != 0 {
                let a = &self.values[i];
                a.store(a.load(Relaxed).wrapping_add(*v), Relaxed);
                *v = 0;
            }
        }
    }
    pub fn snapshot(&self) -> [u64; Counter::COUNT] {
        std::array::from_fn(|i| self.values[i].load(Relaxed))
    }
}

/// Counts kept in registers / L1 during one batch.
#[derive(Clone, Copy)]
pub struct Tally(pub [u64; Counter::COUNT]);

impl Default for Tally {
    fn default() -> Self {
        Tally([0; Counter::COUNT])
    }
}

impl Tally {
    #[inline(always)]
    pub fn add(&mut self, c: Counter, n: u64) {
        self.0[c as usize] += n;
    }
    #[inline(always)]
    pub fn inc(&mut self, c: Counter) {
        self.0[c as usize] += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_adds_and_resets() {
        let s = WorkerStats::default();
        let mut t = Tally::default();
        t.inc(Counter::RxPackets);
        t.add(Counter::RxBytes, 60);
        s.flush(&mut t);
        t.inc(Counter::RxPackets);
        s.flush(&mut t);
        assert_eq!(s.get(Counter::RxPackets), 2);
        assert_eq!(s.get(Counter::RxBytes), 60);
        assert_eq!(t.0.iter().sum::<u64>(), 0);
    }

    #[test]
    fn names_are_unique_and_classified() {
        let mut names: Vec<_> = Counter::ALL.iter().map(|c| c.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Counter::COUNT);
        assert!(Counter::DropTxRingFull.is_drop() && Counter::SlowVlan.is_slow_path());
        assert_eq!(std::mem::align_of::<WorkerStats>(), 64);
    }
}
