//! The per-queue worker: one thread, pinned to a core, owning one RX queue
//! index on every port (its sockets and rings are [`Rings`], xsk.rs). The
//! worker is the only thread touching its rings and counters; the tables
//! it reads are an immutable snapshot loaded once per turn.
//!
//! One turn of the loop, top to bottom:
//! 1. reclaim completed TX frames and refill the fill rings;
//! 2. receive a batch per port and decide per frame: WireGuard from the
//!    uplink is opened and routed (tunnel/rx.rs), anything else is routed
//!    from its LAN (forward.rs); frames for the LAN are staged on their
//!    port, frames for the kernel go to the slow path, frames for a peer
//!    wait for step 3;
//! 3. seal the frames for peers, one run per peer (tunnel/tx.rs), and
//!    stage them on the uplink;
//! 4. submit TX with one kick per port when enough waits (xsk.rs), flush
//!    the counters, and sleep in poll() only when every port was idle (or
//!    spin, with busy polling).

use crate::capture::{CaptureHook, Direction, Tap};
use crate::error::{Error, Result};
use crate::forward::{Verdict, route_frame};
use crate::policy::{self, RuleTally};
use crate::slowpath::SlowPath;
use crate::stats::{Counter, Tally, WorkerStats};
use crate::tables::{SharedTables, Tables};
use crate::tunnel::rx::{PeerRx, decapsulate, is_wireguard};
use crate::tunnel::tx::{PeerRun, Sealed};
use crate::xsk::{Rings, XskOptions};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;
use xsk_rs::FrameDesc;

/// What `subway` prints and shows about a worker.
#[derive(Clone, Debug)]
pub struct WorkerInfo {
    pub id: usize,
    pub queue: u32,
    pub core: Option<usize>,
    pub zero_copy: bool,
    pub ports: Vec<String>,
}

/// A frame bound for a peer, waiting for the turn's seal step.
#[derive(Clone, Copy)]
struct ToPeer {
    desc: FrameDesc,
    peer: u32,
    /// The IP packet is `frame[l3..l3 + ip_len]`.
    l3: usize,
    ip_len: usize,
}

pub struct Worker {
    info: WorkerInfo,
    rings: Rings,
    stats: Arc<WorkerStats>,
}

impl Worker {
    /// Binds a socket per port on `queue` (see [`Rings::new`]).
    pub fn new(
        id: usize,
        queue: u32,
        core: Option<usize>,
        ports: &[(u16, String)],
        opts: XskOptions,
    ) -> Result<Worker> {
        let rings = Rings::new(id, queue, ports, opts)?;
        let info = WorkerInfo {
            id,
            queue,
            core,
            zero_copy: rings.zero_copy(),
            ports: rings.ifnames().map(String::from).collect(),
        };
        Ok(Worker {
            info,
            rings,
            stats: Arc::new(WorkerStats::default()),
        })
    }

    pub fn info(&self) -> &WorkerInfo {
        &self.info
    }

    pub fn stats(&self) -> Arc<WorkerStats> {
        self.stats.clone()
    }

    /// (interface, raw fd) of each socket, for reading [`crate::xsk::XskStats`].
    pub fn socket_fds(&self) -> Vec<(String, std::os::fd::RawFd)> {
        self.rings.socket_fds()
    }

    /// (port index, socket) pairs to register in the XSKMAP.
    pub fn sockets(&self) -> impl Iterator<Item = (u16, &xsk_rs::socket::Fd)> {
        self.rings.sockets()
    }

    /// Starts the worker thread, pinned to its core if it has one.
    pub fn spawn(
        mut self,
        tables: SharedTables,
        slow: Arc<SlowPath>,
        capture: Arc<CaptureHook>,
        stop: Arc<AtomicBool>,
    ) -> Result<JoinHandle<()>> {
        let name = format!("subway-w{}", self.info.id);
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                if let Some(core) = self.info.core
                    && !core_affinity::set_for_current(core_affinity::CoreId { id: core })
                {
                    tracing::warn!(worker = self.info.id, core, "could not pin to core");
                }
                if self.rings.opts().busy_poll {
                    self.rings.set_busy_poll();
                }
                self.run(&tables, &slow, &capture, &stop);
            })
            .map_err(|e| Error::io("spawning a worker thread", e))
    }

    fn run(&mut self, tables: &SharedTables, slow: &SlowPath, capture: &CaptureHook, stop: &AtomicBool) {
        let opts = *self.rings.opts();
        let batch = opts.batch_size;
        let mut descs = vec![FrameDesc::default(); batch.max(opts.ring_size as usize)];
        let mut tally = Tally::default();
        let mut empty_polls = 0u32;
        let mut turns = 0u64;
        // Test hook: SUBWAY_TEST_WEDGE_WORKER_AFTER_SECS wedges worker 0
        // (it stops turning, as a bug or a stuck syscall would) so that
        // tests see the liveness check act; production never sets it.
        let wedge_at = (self.info.id == 0)
            .then(|| std::env::var("SUBWAY_TEST_WEDGE_WORKER_AFTER_SECS").ok())
            .flatten()
            .and_then(|v| v.parse().ok())
            .map(|s| std::time::Instant::now() + Duration::from_secs(s));
        let mut to_peers: Vec<ToPeer> = Vec::with_capacity(batch * self.rings.ports());
        while !stop.load(Ordering::Relaxed) {
            turns += 1;
            self.stats.beat(turns);
            if wedge_at.is_some_and(|t| std::time::Instant::now() >= t) {
                tracing::warn!(
                    worker = self.info.id,
                    "wedged on purpose (SUBWAY_TEST_WEDGE_WORKER_AFTER_SECS)"
                );
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                }
                break;
            }
            self.rings.reclaim(&mut descs);
            self.rings.refill();

            let snap = tables.load();
            // One relaxed load per turn when no capture runs.
            let tap = capture.current();
            let tap = tap.as_deref();
            let now = crate::wg::Now::system().mono;
            let mut got = 0usize;
            for port in 0..self.rings.ports() {
                let n = self.rings.receive(port, &mut descs[..batch]);
                if n == 0 {
                    continue;
                }
                got += n;
                tally.inc(Counter::RxBatches);
                tally.add(Counter::RxPackets, n as u64);
                self.receive_batch(
                    port as u16,
                    &mut descs[..n],
                    &snap,
                    slow,
                    now,
                    tap,
                    &mut to_peers,
                    &mut tally,
                );
            }
            if !to_peers.is_empty() {
                self.seal_for_peers(&mut to_peers, &snap, slow, now, tap, &mut tally);
            }
            // Kick now if the rings were empty: nothing more is coming soon.
            self.rings.transmit(&mut tally, got == 0);
            drop(snap);
            self.stats.flush(&mut tally);

            if got > 0 {
                empty_polls = 0;
            } else {
                // Spin briefly before sleeping: under load the rings are
                // empty between bursts for microseconds, and a sleep and
                // wakeup would cost more than the burst.
                empty_polls = empty_polls.saturating_add(1);
                if empty_polls > opts.idle_spin {
                    self.rings.idle(&mut tally);
                } else {
                    std::hint::spin_loop();
                }
            }
        }
        self.stats.flush(&mut tally);
    }

    /// Step 2: decides each frame received on `ingress`; frames for peers
    /// are left in `to_peers` for step 3.
    #[allow(clippy::too_many_arguments)]
    fn receive_batch(
        &mut self,
        ingress: u16,
        descs: &mut [FrameDesc],
        snap: &Tables,
        slow: &SlowPath,
        now: Duration,
        tap: Option<&Tap>,
        to_peers: &mut Vec<ToPeer>,
        tally: &mut Tally,
    ) {
        let id = self.info.id;
        let from_uplink = snap.uplink == Some(ingress);
        let in_vnet = snap.ports.get(ingress as usize).map_or(0, |p| p.vnet);
        let mut rx_acc = PeerRx::default();
        let mut rules = RuleTally::default();
        let flows = snap.policies.flows.as_deref();
        let now_secs = now.as_secs() as u32;
        for d in descs.iter_mut() {
            let (verdict, v6) = {
                // SAFETY: the frame came off our RX ring, so the kernel is
                // done with it and nothing else refers to it.
                let mut data = unsafe { self.rings.umem().data_mut(d) };
                let len = data.contents().len();
                tally.add(Counter::RxBytes, len as u64);
                // Copied as received: a datagram is opened in place below.
                let held = tap.and_then(|t| t.copy(id, ingress, Direction::In, data.contents()));
                let mut peer = None;
                let mut vnet = in_vnet;
                let v = if from_uplink && is_wireguard(data.contents(), snap) {
                    // Open in place, using the frame's whole capacity.
                    let cap = data.cursor().buf_len();
                    data.cursor().set_pos(cap);
                    let (v, new_len, counted) = decapsulate(data.contents_mut(), len, snap, now);
                    data.cursor().set_pos(new_len);
                    if let Some((from, bytes)) = counted {
                        rx_acc.add(from, bytes, snap);
                        vnet = snap.peers.get(from as usize).map_or(vnet, |p| p.vnet);
                        peer = Some(from);
                    }
                    if matches!(v, Verdict::Tx(_) | Verdict::SlowPath(..)) {
                        tally.inc(Counter::TunnelRx);
                    }
                    v
                } else {
                    route_frame(data.contents_mut(), ingress, snap)
                };
                // [Policy]: judged before anything leaves, the kernel path
                // included.
                // (No policy in the VNET: the verdict is not even looked at.)
                let judged = snap
                    .policies
                    .of(vnet)
                    .and_then(|pol| Some((pol, policy::policed_ip(&v, data.contents())?)));
                let v = match judged {
                    Some((pol, ip)) => {
                        let ing = match peer {
                            Some(p) => policy::Ingress::Peer(p),
                            None => policy::Ingress::Lan(ingress),
                        };
                        let d = policy::check(pol, flows, vnet, ing, ip, now_secs, false);
                        rules.add(pol, d, ip.len());
                        if d.passes() {
                            v
                        } else {
                            Verdict::Drop(Counter::DropPolicy)
                        }
                    }
                    None => v,
                };
                let frame = data.contents();
                let v = match v {
                    Verdict::SlowPath(l3, reason) => match slow.hand_off(vnet, &frame[l3..], reason, now) {
                        c if c == reason => v,
                        c => Verdict::Drop(c),
                    },
                    v => v,
                };
                if let Some(t) = tap {
                    if let Verdict::Tunnel { peer: to, .. } = v {
                        peer = Some(to);
                    }
                    if let Some(r) = held {
                        t.commit(id, r, peer);
                    }
                    if let Verdict::Tx(out) = v
                        && let Some(r) = t.copy(id, out, Direction::Out, frame)
                    {
                        t.commit(id, r, peer);
                    }
                }
                (v, frame.len() > 13 && frame[12] == 0x86)
            };
            match verdict {
                Verdict::Tx(out) => {
                    if self.rings.stage(out as usize, *d) {
                        tally.inc(if v6 { Counter::ForwardedV6 } else { Counter::ForwardedV4 });
                    } else {
                        tally.inc(Counter::DropNoTunnel);
                    }
                }
                Verdict::Tunnel { peer, l3, ip_len } => to_peers.push(ToPeer {
                    desc: *d,
                    peer,
                    l3,
                    ip_len,
                }),
                Verdict::SlowPath(_, reason) | Verdict::Drop(reason) => {
                    tally.inc(reason);
                    self.rings.recycle(*d);
                }
            }
        }
        rx_acc.flush(snap);
        rules.flush();
    }

    /// Step 3: seals every frame bound for a peer, a run per peer, and
    /// stages it on the uplink. A peer that cannot be sent to from here
    /// (no session, no path) gets its frames sent through the kernel.
    fn seal_for_peers(
        &mut self,
        pending: &mut Vec<ToPeer>,
        snap: &Tables,
        slow: &SlowPath,
        now: Duration,
        tap: Option<&Tap>,
        tally: &mut Tally,
    ) {
        let uplink = snap.uplink.map(|u| u as usize).filter(|u| *u < self.rings.ports());
        for (peer, frames) in crate::tunnel::tx::peer_runs(pending, |f| f.peer) {
            let vnet = snap
                .peers
                .get(peer as usize)
                .map_or(crate::slowpath::NO_VNET, |r| r.vnet);
            let mut run = uplink.and_then(|up| Some((up, PeerRun::begin(snap, peer, frames.len(), now)?)));
            for (k, mut f) in frames.iter().copied().enumerate() {
                // SAFETY: the frame is ours (taken off an RX ring this turn).
                let mut data = unsafe { self.rings.umem().data_mut(&mut f.desc) };
                let sealed = match run.as_mut() {
                    Some((up, run)) => {
                        let cap = data.cursor().buf_len();
                        data.cursor().set_pos(cap);
                        match run.seal(k, data.contents_mut(), f.l3, f.ip_len, tally) {
                            Sealed::Datagram(n) => {
                                data.cursor().set_pos(n);
                                if let Some(t) = tap
                                    && let Some(r) = t.copy(self.info.id, *up as u16, Direction::Out, data.contents())
                                {
                                    t.commit(self.info.id, r, Some(peer));
                                }
                                self.rings.stage(*up, f.desc);
                                continue;
                            }
                            other => other,
                        }
                    }
                    None => Sealed::ToKernel(Counter::SlowNoSession),
                };
                if let Sealed::ToKernel(reason) = sealed {
                    let frame = data.contents();
                    tally.inc(slow.hand_off(vnet, &frame[f.l3..f.l3 + f.ip_len], reason, now));
                } else if let Sealed::Dropped(reason) = sealed {
                    tally.inc(reason);
                }
                self.rings.recycle(f.desc);
            }
            if let Some((_, run)) = run {
                run.finish();
            }
        }
        pending.clear();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        tracing::debug!(worker = self.info.id, ports = ?self.info.ports, "closing AF_XDP sockets");
    }
}
