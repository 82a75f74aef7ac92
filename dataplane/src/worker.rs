//! AF_XDP workers. A worker owns one RX queue index on every port: one
//! UMEM shared by a socket per (port, queue), with each socket's fill,
//! completion, RX and TX rings. A frame received on one port is rewritten
//! in place and transmitted on another without a copy. The worker is the
//! only thread touching its rings and counters; the tables it reads are an
//! immutable snapshot loaded once per batch.
//!
//! The loop, top to bottom: reclaim completed TX frames, refill fill rings,
//! receive a batch per port, decide per frame (forward.rs), queue per
//! egress port, submit TX with one wakeup per port per batch, and sleep in
//! poll() only when every port was idle (or spin, with busy polling).

use crate::error::{Context, Error, Result};
use crate::forward::{Verdict, route_frame};
use crate::slowpath::SlowPath;
use crate::stats::{Counter, Tally, WorkerStats};
use crate::tables::SharedTables;
use std::num::NonZeroU32;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use xsk_rs::config::{BindFlags, FrameSize, LibxdpFlags, QueueSize, SocketConfig, UmemConfig};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

/// Copy or zero-copy AF_XDP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BindMode {
    /// Zero-copy where the driver supports it, else copy.
    #[default]
    Auto,
    Copy,
    ZeroCopy,
}

impl std::str::FromStr for BindMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().replace(['-', '_'], "").as_str() {
            "auto" => Ok(BindMode::Auto),
            "copy" => Ok(BindMode::Copy),
            "zerocopy" | "zc" => Ok(BindMode::ZeroCopy),
            _ => Err(format!("unknown AF_XDP mode {s:?}: use auto, copy or zero-copy")),
        }
    }
}

/// Socket and loop tuning, from `[Tuning]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XskOptions {
    /// Frames taken from a ring per call.
    pub batch_size: usize,
    /// Size of each RX, TX, fill and completion ring (power of two).
    pub ring_size: u32,
    /// UMEM frame size: 2048 or 4096.
    pub frame_size: u32,
    pub bind: BindMode,
    /// Sleep in poll() when idle (XDP_USE_NEED_WAKEUP); off means spin.
    pub need_wakeup: bool,
    /// Set SO_BUSY_POLL / SO_PREFER_BUSY_POLL and drive the queue from the
    /// worker instead of interrupts; implies spinning.
    pub busy_poll: bool,
    /// Empty polls in a row before sleeping in poll(). Spinning avoids a
    /// sleep and wakeup between bursts on a core the worker has to itself;
    /// on a core shared with the NIC's softirq/NAPI it takes time from it.
    pub idle_spin: u32,
}

impl Default for XskOptions {
    fn default() -> Self {
        XskOptions {
            batch_size: 64,
            ring_size: 2048,
            frame_size: 2048,
            bind: BindMode::Auto,
            need_wakeup: true,
            busy_poll: false,
            idle_spin: 512,
        }
    }
}

impl XskOptions {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.batch_size == 0 || self.batch_size > 1024 {
            return Err(format!("BatchSize {} out of range: use 1 to 1024", self.batch_size));
        }
        if !self.ring_size.is_power_of_two() || self.ring_size < 64 || self.ring_size > 16384 {
            return Err(format!(
                "RingSize {} must be a power of two from 64 to 16384",
                self.ring_size
            ));
        }
        if self.frame_size != 2048 && self.frame_size != 4096 {
            return Err(format!("FrameSize {} must be 2048 or 4096", self.frame_size));
        }
        if self.batch_size as u32 > self.ring_size {
            return Err("BatchSize must not exceed RingSize".into());
        }
        Ok(())
    }
}

/// Frames that wait on a TX ring before the kernel is kicked under load.
const KICK_THRESHOLD: u32 = 32;

/// The uplink's receive path: WireGuard data datagrams to LAN frames.
mod tunnel_rx {
    use crate::fib::Target;
    use crate::forward::Verdict;
    use crate::stats::Counter;
    use crate::tables::Tables;
    use crate::tunnel::{parse_inner, parse_outer, to_lan_frame};
    use crate::wg::WgError;
    use crate::wg::messages::{DATA_HEADER_LEN, DATA_MIN_LEN, TYPE_DATA};
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    /// A UDP datagram to one of our uplink addresses and our listen port?
    #[inline]
    pub fn is_wireguard(frame: &[u8], t: &Tables) -> bool {
        t.listen_port != 0
            && parse_outer(frame).is_some_and(|r| {
                let l4 = r.msg_start - 8;
                u16::from_be_bytes([frame[l4 + 2], frame[l4 + 3]]) == t.listen_port && t.uplink_addrs.contains(&r.dst)
            })
    }

    /// Opens a data message and turns it into a LAN frame in place.
    /// Returns the verdict, the frame's new length, and the peer and inner
    /// bytes to count (the caller adds them up per batch).
    pub fn decapsulate(buf: &mut [u8], len: usize, t: &Tables, now: Duration) -> (Verdict, usize, Option<(u32, u64)>) {
        let drop = |c| (Verdict::Drop(c), len, None);
        let Some(r) = parse_outer(&buf[..len]) else {
            return drop(Counter::DropOuterMalformed);
        };
        let msg = &mut buf[r.msg_start..r.msg_end];
        if msg.len() < DATA_MIN_LEN || msg[0] != TYPE_DATA {
            return drop(Counter::DropWgNotData);
        }
        let receiver = u32::from_le_bytes([msg[4], msg[5], msg[6], msg[7]]);
        let Some(session) = t.sessions.get(&receiver) else {
            return drop(Counter::DropWgUnknownIndex);
        };
        let plain_len = match session.open(msg, now) {
            Ok(p) => p.len(),
            Err(WgError::Replayed) => return drop(Counter::DropWgReplayed),
            Err(WgError::Expired) => return drop(Counter::DropWgExpired),
            Err(_) => return drop(Counter::DropWgDecryptFailed),
        };
        let Some(peer) = t.peers.get(session.peer as usize) else {
            return drop(Counter::DropWgUnknownIndex);
        };
        // Authenticated: if it came from elsewhere than the published
        // endpoint, the peer roamed; tell the control thread (IPv4; IPv6
        // roaming is followed on handshakes).
        if let (Some(path), std::net::SocketAddr::V4(src)) = (&peer.path, r.src)
            && path.dst != r.src
        {
            peer.stats
                .roamed_v4
                .store(crate::tables::PeerStats::pack_v4(src), Ordering::Relaxed);
        }
        if plain_len == 0 {
            peer.stats.rx_keepalives.fetch_add(1, Ordering::Relaxed);
            return drop(Counter::RxKeepalives);
        }
        let start = r.msg_start + DATA_HEADER_LEN;
        let Some(inner) = parse_inner(&buf[start..start + plain_len]) else {
            return drop(Counter::DropInnerMalformed);
        };
        // Cryptokey routing: the source must route back to this very peer.
        if !matches!(t.fib.lookup(peer.vnet, inner.src), Some((_, Target::Peer(p))) if p == session.peer) {
            return drop(Counter::DropNotAllowed);
        }
        let counted = Some((session.peer, inner.len as u64));
        enum Next {
            Lan(u16, crate::wire::MacAddr, crate::wire::MacAddr),
            Kernel(Counter),
            Drop(Counter),
        }
        let next = match t.fib.lookup(peer.vnet, inner.dst) {
            Some((len, Target::Port(_))) if crate::fib::Fib::is_directed_broadcast(inner.dst, len) => {
                Next::Drop(Counter::DropDirectedBroadcast)
            }
            Some((_, Target::Port(p))) => match t.ports.get(p as usize) {
                None => Next::Kernel(Counter::SlowNoRoute),
                Some(_) if inner.ttl <= 1 => Next::Kernel(Counter::SlowTtlExpired),
                Some(out) if inner.len > out.mtu as usize => Next::Kernel(Counter::SlowTooBig),
                Some(out) => match t.neigh.get(out.ifindex, inner.dst) {
                    Some(mac) => Next::Lan(p, mac, out.mac),
                    None => Next::Kernel(Counter::SlowNeighUnknown),
                },
            },
            Some((_, Target::Local)) => Next::Kernel(Counter::SlowLocal),
            _ => Next::Kernel(Counter::SlowNoRoute),
        };
        if let Some(up) = t.uplink.and_then(|u| t.ports.get(u as usize)) {
            let _ = crate::tunnel::clamp_mss(
                &mut buf[start..start + inner.len],
                up.mtu.saturating_sub(crate::tunnel::TUNNEL_OVERHEAD),
            );
        }
        match next {
            Next::Lan(p, dst_mac, src_mac) => (
                Verdict::Tx(p),
                to_lan_frame(buf, start, inner.len, dst_mac, src_mac),
                counted,
            ),
            Next::Drop(c) => (Verdict::Drop(c), len, counted),
            Next::Kernel(c) => {
                // Hand the inner packet, untouched, to the kernel.
                buf.copy_within(start..start + inner.len, 0);
                (Verdict::SlowPath(0, c), inner.len, counted)
            }
        }
    }
}

/// Received-from-peer counts gathered during a batch: the peer counters
/// are shared by every worker, so they get one add per run of packets from
/// the same peer instead of one per packet.
#[derive(Default)]
struct PeerRx {
    peer: Option<u32>,
    packets: u64,
    bytes: u64,
}

impl PeerRx {
    #[inline]
    fn add(&mut self, peer: u32, bytes: u64, t: &crate::tables::Tables) {
        if self.peer != Some(peer) {
            self.flush(t);
            self.peer = Some(peer);
        }
        self.packets += 1;
        self.bytes += bytes;
    }

    fn flush(&mut self, t: &crate::tables::Tables) {
        if let Some(p) = self.peer.take()
            && let Some(rt) = t.peers.get(p as usize)
        {
            rt.stats.rx_packets.fetch_add(self.packets, Ordering::Relaxed);
            rt.stats.rx_bytes.fetch_add(self.bytes, Ordering::Relaxed);
        }
        self.packets = 0;
        self.bytes = 0;
    }
}

/// Loops a frame may wait on a TX ring for company before a kick.
const KICK_AFTER_LOOPS: u32 = 8;

/// One port's socket on this worker's queue.
struct PortXsk {
    port: u16,
    ifname: String,
    rx: RxQueue,
    tx: TxQueue,
    fill: FillQueue,
    comp: CompQueue,
    /// Frames submitted to TX and not yet completed.
    in_flight: u32,
    /// Frames on the TX ring the kernel has not been kicked for.
    unkicked: u32,
    /// Loops those frames have waited.
    unkicked_loops: u32,
    /// Frames staged for TX on this port during the current batch.
    stage: Vec<FrameDesc>,
}

/// What `subway` prints and shows about a worker.
#[derive(Clone, Debug)]
pub struct WorkerInfo {
    pub id: usize,
    pub queue: u32,
    pub core: Option<usize>,
    pub zero_copy: bool,
    pub ports: Vec<String>,
}

pub struct Worker {
    info: WorkerInfo,
    opts: XskOptions,
    umem: Umem,
    free: Vec<FrameDesc>,
    socks: Vec<PortXsk>,
    stats: Arc<WorkerStats>,
}

fn socket_config(opts: &XskOptions, zero_copy: bool) -> Result<SocketConfig> {
    let q = QueueSize::new(opts.ring_size).ctx(|| "ring size".into())?;
    let mut bind = if zero_copy {
        BindFlags::XDP_ZEROCOPY
    } else {
        BindFlags::XDP_COPY
    };
    if opts.need_wakeup && !opts.busy_poll {
        bind |= BindFlags::XDP_USE_NEED_WAKEUP;
    }
    Ok(SocketConfig::builder()
        .rx_queue_size(q)
        .tx_queue_size(q)
        .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
        .bind_flags(bind)
        .build())
}

fn umem_config(opts: &XskOptions) -> Result<UmemConfig> {
    let q = QueueSize::new(opts.ring_size).ctx(|| "ring size".into())?;
    UmemConfig::builder()
        .frame_size(FrameSize::new(opts.frame_size).ctx(|| "frame size".into())?)
        .fill_queue_size(q)
        .comp_queue_size(q)
        .build()
        .ctx(|| "UMEM config".into())
}

/// Can (ifname, queue) bind in zero-copy mode? Probed with a throwaway
/// UMEM so a refusal leaves nothing behind.
pub fn probe_zero_copy(ifname: &str, queue: u32, opts: &XskOptions) -> bool {
    let Ok(cfg) = umem_config(opts) else { return false };
    let Ok((umem, _)) = Umem::new(cfg, NonZeroU32::new(opts.ring_size * 2).unwrap(), false) else {
        return false;
    };
    let (Ok(sc), Ok(iface)) = (socket_config(opts, true), ifname.parse()) else {
        return false;
    };
    // SAFETY: a fresh UMEM, not shared; the socket is dropped at once.
    unsafe { Socket::new(sc, &umem, &iface, queue) }.is_ok()
}

impl Worker {
    /// Creates the UMEM and one socket per port on `queue`. `ports` are
    /// (port index, interface name), in port order (index i at position i). Zero-copy is decided per worker: all
    /// sockets on one UMEM share the first socket's mode.
    pub fn new(
        id: usize,
        queue: u32,
        core: Option<usize>,
        ports: &[(u16, String)],
        opts: XskOptions,
    ) -> Result<Worker> {
        opts.validate().map_err(Error::msg)?;
        if ports.iter().enumerate().any(|(i, (p, _))| *p as usize != i) {
            return Err(Error::msg("worker ports must be given in port order"));
        }
        let zero_copy = match opts.bind {
            BindMode::Copy => false,
            BindMode::ZeroCopy => true,
            BindMode::Auto => ports.iter().all(|(_, n)| probe_zero_copy(n, queue, &opts)),
        };
        let frames = (ports.len() as u32) * opts.ring_size * 2;
        let (umem, descs) = Umem::new(umem_config(&opts)?, NonZeroU32::new(frames).unwrap(), false)
            .ctx(|| format!("worker {id}: creating a UMEM of {frames} frames"))?;
        let sc = socket_config(&opts, zero_copy)?;
        let mut socks = Vec::with_capacity(ports.len());
        for (port, ifname) in ports {
            let iface = ifname.parse().ctx(|| format!("interface name {ifname:?}"))?;
            // SAFETY: each (interface, queue) pair is bound once per UMEM,
            // and libxdp is told not to load a program of its own.
            let (tx, rx, fq) = unsafe { Socket::new(sc, &umem, &iface, queue) }.ctx(|| {
                format!(
                    "binding an AF_XDP socket to {ifname} queue {queue} ({} mode)",
                    if zero_copy { "zero-copy" } else { "copy" }
                )
            })?;
            let (fill, comp) =
                fq.ok_or_else(|| Error::msg(format!("{ifname} queue {queue}: bound twice on one UMEM")))?;
            socks.push(PortXsk {
                port: *port,
                ifname: ifname.clone(),
                rx,
                tx,
                fill,
                comp,
                in_flight: 0,
                unkicked: 0,
                unkicked_loops: 0,
                stage: Vec::with_capacity(opts.batch_size),
            });
        }
        let info = WorkerInfo {
            id,
            queue,
            core,
            zero_copy,
            ports: ports.iter().map(|(_, n)| n.clone()).collect(),
        };
        let mut w = Worker {
            info,
            opts,
            umem,
            free: descs,
            socks,
            stats: Arc::new(WorkerStats::default()),
        };
        // Fill rings are stocked before XDP is attached, so the first
        // frames have somewhere to land.
        w.refill();
        Ok(w)
    }

    pub fn info(&self) -> &WorkerInfo {
        &self.info
    }

    pub fn stats(&self) -> Arc<WorkerStats> {
        self.stats.clone()
    }

    /// (interface, raw fd) of each socket, for reading [`XskStats`].
    pub fn socket_fds(&self) -> Vec<(String, std::os::fd::RawFd)> {
        self.socks
            .iter()
            .map(|s| (s.ifname.clone(), s.rx.fd().as_raw_fd()))
            .collect()
    }

    /// (port index, socket) pairs to register in the XSKMAP.
    pub fn sockets(&self) -> impl Iterator<Item = (u16, &xsk_rs::socket::Fd)> {
        self.socks.iter().map(|s| (s.port, s.rx.fd()))
    }

    /// Starts the worker thread, pinned to its core if it has one.
    pub fn spawn(mut self, tables: SharedTables, slow: Arc<SlowPath>, stop: Arc<AtomicBool>) -> Result<JoinHandle<()>> {
        let name = format!("subway-w{}", self.info.id);
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                if let Some(core) = self.info.core
                    && !core_affinity::set_for_current(core_affinity::CoreId { id: core })
                {
                    tracing::warn!(worker = self.info.id, core, "could not pin to core");
                }
                if self.opts.busy_poll {
                    for s in &self.socks {
                        set_busy_poll(s.rx.fd().as_raw_fd(), self.opts.batch_size);
                    }
                }
                self.run(&tables, &slow, &stop);
            })
            .map_err(|e| Error::io("spawning a worker thread", e))
    }

    fn run(&mut self, tables: &SharedTables, slow: &SlowPath, stop: &AtomicBool) {
        let batch = self.opts.batch_size;
        let mut descs = vec![FrameDesc::default(); batch.max(self.opts.ring_size as usize)];
        let mut tally = Tally::default();
        let mut pollfds: Vec<libc::pollfd> = self
            .socks
            .iter()
            .map(|s| libc::pollfd {
                fd: s.rx.fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();

        let mut empty_polls = 0u32;
        let mut turns = 0u64;
        // Test hook: SUBWAY_TEST_WEDGE_WORKER_AFTER_SECS wedges worker 0
        // (it stops turning, as a bug or a stuck syscall would) so that
        // tests see the liveness check act; production never sets it.
        let wedge_at = (self.info.id == 0)
            .then(|| std::env::var("SUBWAY_TEST_WEDGE_WORKER_AFTER_SECS").ok())
            .flatten()
            .and_then(|v| v.parse().ok())
            .map(|s| std::time::Instant::now() + std::time::Duration::from_secs(s));
        let mut rx_acc = PeerRx::default();
        let mut tunnel_pending: Vec<(FrameDesc, u32, usize, usize)> = Vec::with_capacity(batch * self.socks.len());
        while !stop.load(Ordering::Relaxed) {
            turns += 1;
            self.stats.beat(turns);
            if wedge_at.is_some_and(|t| std::time::Instant::now() >= t) {
                tracing::warn!(
                    worker = self.info.id,
                    "wedged on purpose (SUBWAY_TEST_WEDGE_WORKER_AFTER_SECS)"
                );
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                break;
            }
            self.reclaim(&mut descs);
            self.refill();

            let snap = tables.load();
            let now = crate::wg::Now::system().mono;
            let mut got = 0usize;
            for i in 0..self.socks.len() {
                // SAFETY: descs are plain slots the RX ring writes into.
                let n = unsafe { self.socks[i].rx.consume(&mut descs[..batch]) };
                if n == 0 {
                    continue;
                }
                got += n;
                tally.inc(Counter::RxBatches);
                tally.add(Counter::RxPackets, n as u64);
                let ingress = self.socks[i].port;
                let from_uplink = snap.uplink == Some(ingress);
                let in_vnet = snap.ports.get(ingress as usize).map_or(0, |p| p.vnet);
                for d in descs.iter_mut().take(n) {
                    let (verdict, v6) = {
                        // SAFETY: the frame came off our RX ring, so the
                        // kernel is done with it and nothing else refers to it.
                        let mut data = unsafe { self.umem.data_mut(d) };
                        let len = data.contents().len();
                        tally.add(Counter::RxBytes, len as u64);
                        let mut vnet = in_vnet;
                        let v = if from_uplink && tunnel_rx::is_wireguard(data.contents(), &snap) {
                            // Open in place, using the frame's whole capacity.
                            let cap = data.cursor().buf_len();
                            data.cursor().set_pos(cap);
                            let (v, new_len, counted) = tunnel_rx::decapsulate(data.contents_mut(), len, &snap, now);
                            data.cursor().set_pos(new_len);
                            if let Some((peer, bytes)) = counted {
                                rx_acc.add(peer, bytes, &snap);
                                vnet = snap.peers.get(peer as usize).map_or(vnet, |p| p.vnet);
                            }
                            if matches!(v, Verdict::Tx(_) | Verdict::SlowPath(..)) {
                                tally.inc(Counter::TunnelRx);
                            }
                            v
                        } else {
                            route_frame(data.contents_mut(), ingress, &snap)
                        };
                        let frame = data.contents();
                        let v = match v {
                            Verdict::SlowPath(l3, reason) => match slow.hand_off(vnet, &frame[l3..], reason, now) {
                                c if c == reason => v,
                                c => Verdict::Drop(c),
                            },
                            v => v,
                        };
                        (v, frame.len() > 13 && frame[12] == 0x86)
                    };
                    match verdict {
                        Verdict::Tx(out) => match self.socks.get_mut(out as usize) {
                            Some(s) => {
                                tally.inc(if v6 { Counter::ForwardedV6 } else { Counter::ForwardedV4 });
                                s.stage.push(*d);
                            }
                            None => {
                                tally.inc(Counter::DropNoTunnel);
                                self.free.push(*d);
                            }
                        },
                        Verdict::Tunnel { peer, l3, ip_len } => tunnel_pending.push((*d, peer, l3, ip_len)),
                        Verdict::SlowPath(_, reason) | Verdict::Drop(reason) => {
                            tally.inc(reason);
                            self.free.push(*d);
                        }
                    }
                }
            }
            rx_acc.flush(&snap);
            if !tunnel_pending.is_empty() {
                self.encapsulate_pending(&mut tunnel_pending, &snap, slow, now, &mut tally);
            }
            // Kick now if the rings were empty: nothing more is coming soon.
            self.transmit(&mut tally, got == 0);
            drop(snap);
            self.stats.flush(&mut tally);

            if got > 0 {
                empty_polls = 0;
            } else {
                // Spin briefly before sleeping: under load the rings are
                // empty between bursts for microseconds, and a sleep and
                // wakeup would cost more than the burst.
                empty_polls = empty_polls.saturating_add(1);
                if empty_polls > self.opts.idle_spin {
                    self.idle(&mut pollfds, &mut tally);
                } else {
                    std::hint::spin_loop();
                }
            }
        }
        self.stats.flush(&mut tally);
    }

    /// Submits every staged frame; what does not fit the ring is dropped.
    /// The kernel is kicked once enough frames wait (or when `force`):
    /// under load frames arrive a few per loop, and a sendto() per few
    /// frames would cost more than the frames themselves.
    fn transmit(&mut self, tally: &mut Tally, force: bool) {
        let kick_always = self.kick_always();
        for s in self.socks.iter_mut() {
            if !s.stage.is_empty() {
                // Ring reservation is all or nothing: ask for what fits.
                let room = s.tx.nb_free(s.stage.len() as u32) as usize;
                let take = room.min(s.stage.len());
                // SAFETY: staged frames are ours until they come back on
                // the completion ring.
                let sent = unsafe { s.tx.produce(&s.stage[..take]) };
                for d in &s.stage[..sent] {
                    tally.add(Counter::TxBytes, d.lengths().data() as u64);
                }
                tally.add(Counter::TxPackets, sent as u64);
                s.in_flight += sent as u32;
                s.unkicked += sent as u32;
                if sent < s.stage.len() {
                    tally.add(Counter::DropTxRingFull, (s.stage.len() - sent) as u64);
                    self.free.extend_from_slice(&s.stage[sent..]);
                }
                s.stage.clear();
            }
            if s.unkicked == 0 {
                continue;
            }
            // Frames trickling one way while the other way is busy must not
            // wait for a full batch: kick after a few loops regardless.
            s.unkicked_loops += 1;
            if !force && s.unkicked < KICK_THRESHOLD && s.unkicked_loops < KICK_AFTER_LOOPS {
                continue;
            }
            // Copy mode sends at most 32 frames per sendto() (the kernel's
            // TX_BATCH_SIZE), so kick until the ring is drained, bounded;
            // with zero-copy one kick starts the driver on all of it.
            let ring = self.opts.ring_size;
            for _ in 0..(s.unkicked / 32 + 2) {
                let kernel_wants_kick = kick_always || s.tx.needs_wakeup();
                if !kernel_wants_kick || s.tx.nb_free_exact() >= ring {
                    break;
                }
                tally.inc(Counter::TxWakeups);
                let _ = s.tx.wakeup();
                if self.info.zero_copy {
                    break;
                }
            }
            s.unkicked = 0;
            s.unkicked_loops = 0;
        }
    }

    /// Seals every frame bound for a peer, one counter reservation per peer
    /// per batch, and stages it on the uplink. Frames for a peer with no
    /// session (or no known path) go to the kernel, whose routes send them
    /// to the control thread through the slow-path TUN.
    fn encapsulate_pending(
        &mut self,
        pending: &mut Vec<(FrameDesc, u32, usize, usize)>,
        snap: &crate::tables::Tables,
        slow: &SlowPath,
        now: std::time::Duration,
        tally: &mut Tally,
    ) {
        let uplink = snap.uplink.map(|u| u as usize).filter(|u| *u < self.socks.len());
        let mut i = 0;
        while i < pending.len() {
            let peer = pending[i].1;
            // This peer's frames in this batch: pending[i..j] after a stable
            // partition (one peer is the common case, so usually all).
            let mut j = i;
            for k in i..pending.len() {
                if pending[k].1 == peer {
                    pending.swap(j, k);
                    j += 1;
                }
            }
            let rt = snap.peers.get(peer as usize);
            let vnet = rt.map_or(crate::slowpath::NO_VNET, |r| r.vnet);
            let ready = rt.and_then(|r| Some((r.session.as_ref().filter(|s| s.can_send(now))?, r.path.as_ref()?, r)));
            let first = match (ready, uplink) {
                (Some((s, _, _)), Some(_)) => s.reserve((j - i) as u64).ok(),
                _ => None,
            };
            // Peer counters are shared by the workers: one add per batch.
            let (mut group_pkts, mut group_bytes) = (0u64, 0u64);
            for (k, (mut d, _, l3, ip_len)) in pending[i..j].iter().copied().enumerate() {
                // SAFETY: the frame is ours (taken off an RX ring this batch).
                let mut data = unsafe { self.umem.data_mut(&mut d) };
                let (Some(counter), Some((session, path, _)), Some(up)) = (first, ready, uplink) else {
                    let frame = data.contents();
                    tally.inc(slow.hand_off(vnet, &frame[l3..l3 + ip_len], Counter::SlowNoSession, now));
                    self.free.push(d);
                    continue;
                };
                let tunnel_mtu = snap.ports[up].mtu.saturating_sub(crate::tunnel::TUNNEL_OVERHEAD);
                if ip_len as u32 > tunnel_mtu {
                    // The kernel's route to the peer goes through the TUN,
                    // whose MTU is the tunnel's: it fragments, or answers
                    // "fragmentation needed" / "packet too big".
                    let frame = data.contents();
                    tally.inc(slow.hand_off(vnet, &frame[l3..l3 + ip_len], Counter::SlowTooBig, now));
                    self.free.push(d);
                    continue;
                }
                let cap = data.cursor().buf_len();
                data.cursor().set_pos(cap);
                let buf = data.contents_mut();
                if crate::tunnel::clamp_mss(&mut buf[l3..l3 + ip_len], tunnel_mtu) {
                    tally.inc(Counter::MssClamped);
                }
                if buf[l3] >> 4 == 6 {
                    if let Ok(mut ip) = crate::wire::Ipv6Packet::new_checked(&mut buf[l3..l3 + ip_len]) {
                        ip.decrement_hop_limit();
                    }
                } else if let Ok(mut ip) = crate::wire::Ipv4Packet::new_checked(&mut buf[l3..l3 + ip_len]) {
                    ip.decrement_ttl();
                }
                match crate::tunnel::encapsulate(buf, l3, ip_len, session, counter + k as u64, path) {
                    Ok(n) => {
                        data.cursor().set_pos(n);
                        group_pkts += 1;
                        group_bytes += ip_len as u64;
                        tally.inc(Counter::TunnelTx);
                        self.socks[up].stage.push(d);
                    }
                    Err(_) => {
                        // The counter is spent; the peer tolerates the gap.
                        tally.inc(Counter::DropTooBigForTunnel);
                        self.free.push(d);
                    }
                }
            }
            if let Some((_, _, rt)) = ready
                && group_pkts > 0
            {
                rt.stats.tx_packets.fetch_add(group_pkts, Ordering::Relaxed);
                rt.stats.tx_bytes.fetch_add(group_bytes, Ordering::Relaxed);
            }
            i = j;
        }
        pending.clear();
    }

    /// Without XDP_USE_NEED_WAKEUP on the socket (busy polling, or
    /// NeedWakeup off) the ring flag is never set: always kick.
    fn kick_always(&self) -> bool {
        !self.opts.need_wakeup || self.opts.busy_poll
    }

    /// Takes completed TX frames back.
    fn reclaim(&mut self, scratch: &mut [FrameDesc]) {
        for s in self.socks.iter_mut() {
            if s.in_flight == 0 {
                continue;
            }
            // SAFETY: completion descriptors are frames we submitted.
            let n = unsafe { s.comp.consume(scratch) };
            s.in_flight -= n as u32;
            self.free.extend_from_slice(&scratch[..n]);
        }
    }

    /// Tops every fill ring up from the free frames.
    fn refill(&mut self) {
        let batch = self.opts.batch_size as u32;
        for s in self.socks.iter_mut() {
            // Asking for a batch's worth lets the ring answer from its
            // cached consumer position most of the time.
            let want = s.fill.nb_free(batch) as usize;
            let k = want.min(self.free.len());
            if k == 0 {
                continue;
            }
            let start = self.free.len() - k;
            // SAFETY: free frames are owned by us and not on any ring.
            let done = unsafe { s.fill.produce(&self.free[start..]) };
            if done == k {
                self.free.truncate(start);
            }
            if s.fill.needs_wakeup() {
                let _ = s.fill.wakeup(s.rx.fd_mut(), 0);
            }
        }
    }

    fn idle(&mut self, pollfds: &mut [libc::pollfd], tally: &mut Tally) {
        // Copy-mode TX progresses inside sendto(): kick ports with frames
        // still in flight so their completions come back.
        for s in self.socks.iter_mut() {
            if s.in_flight > 0 && s.tx.nb_free_exact() < self.opts.ring_size {
                let _ = s.tx.wakeup();
            }
        }
        if self.kick_always() {
            for s in &self.socks {
                // A zero-length non-blocking recv drives the busy poll.
                // SAFETY: recvfrom with a null buffer of length 0.
                unsafe {
                    libc::recvfrom(
                        s.rx.fd().as_raw_fd(),
                        std::ptr::null_mut(),
                        0,
                        libc::MSG_DONTWAIT,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                    )
                };
            }
            std::hint::spin_loop();
            return;
        }
        tally.inc(Counter::IdlePolls);
        // Bounded sleep so the stop flag is seen promptly.
        // SAFETY: pollfds is a valid array of pollfd.
        unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, 50) };
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        tracing::debug!(worker = self.info.id, ports = ?self.socks.iter().map(|s| &s.ifname).collect::<Vec<_>>(), "closing AF_XDP sockets");
    }
}

/// The kernel's per-socket AF_XDP counters: frames it could not deliver
/// to us or take from us, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XskStats {
    /// Dropped for reasons other than a full ring (e.g. too big).
    pub rx_dropped: u64,
    pub rx_invalid_descs: u64,
    pub tx_invalid_descs: u64,
    /// The RX ring was full: the worker did not keep up.
    pub rx_ring_full: u64,
    /// The fill ring was empty: no frame to receive into.
    pub rx_fill_ring_empty: u64,
    pub tx_ring_empty: u64,
}

impl XskStats {
    pub const NAMES: [&'static str; 6] = [
        "rx_dropped",
        "rx_invalid_descs",
        "tx_invalid_descs",
        "rx_ring_full",
        "rx_fill_ring_empty",
        "tx_ring_empty",
    ];
    pub fn values(&self) -> [u64; 6] {
        [
            self.rx_dropped,
            self.rx_invalid_descs,
            self.tx_invalid_descs,
            self.rx_ring_full,
            self.rx_fill_ring_empty,
            self.tx_ring_empty,
        ]
    }

    /// Reads them from a live AF_XDP socket (any thread may).
    pub fn read(fd: std::os::fd::RawFd) -> std::io::Result<XskStats> {
        const SOL_XDP: libc::c_int = 283;
        const XDP_STATISTICS: libc::c_int = 7;
        let mut v = [0u64; 6];
        let mut len = std::mem::size_of_val(&v) as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `v`.
        let r = unsafe { libc::getsockopt(fd, SOL_XDP, XDP_STATISTICS, v.as_mut_ptr().cast(), &mut len) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(XskStats {
            rx_dropped: v[0],
            rx_invalid_descs: v[1],
            tx_invalid_descs: v[2],
            rx_ring_full: v[3],
            rx_fill_ring_empty: v[4],
            tx_ring_empty: v[5],
        })
    }
}

fn set_busy_poll(fd: i32, budget: usize) {
    const SO_PREFER_BUSY_POLL: libc::c_int = 69;
    const SO_BUSY_POLL_BUDGET: libc::c_int = 70;
    let set = |opt: libc::c_int, v: libc::c_int| {
        // SAFETY: setsockopt with a pointer to a live c_int.
        unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, opt, (&v as *const libc::c_int).cast(), 4) }
    };
    if set(SO_PREFER_BUSY_POLL, 1) < 0
        || set(libc::SO_BUSY_POLL, 20) < 0
        || set(SO_BUSY_POLL_BUDGET, budget as libc::c_int) < 0
    {
        tracing::warn!(
            fd,
            "busy-poll socket options refused: {}",
            std::io::Error::last_os_error()
        );
    }
}
