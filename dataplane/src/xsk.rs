//! AF_XDP sockets and their rings for one worker: one UMEM shared by a
//! socket per (port, queue), each with its fill, completion, RX and TX
//! rings, and the worker's free frames. Everything here is ring
//! bookkeeping (reclaim, refill, stage, submit, kick, idle); what happens
//! to a frame between RX and TX is the worker's business (worker.rs).
//!
//! Frames move between four places, and only through this type: the free
//! list, a fill ring (the kernel receives into it), a port's stage (to be
//! submitted on its TX ring this turn) and a TX ring (until the frame comes
//! back on the completion ring).

use crate::error::{Context, Error, Result};
use crate::stats::{Counter, Tally};
use std::num::NonZeroU32;
use std::os::fd::AsRawFd;
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

/// A worker's sockets, rings and frames.
pub struct Rings {
    opts: XskOptions,
    zero_copy: bool,
    umem: Umem,
    free: Vec<FrameDesc>,
    socks: Vec<PortXsk>,
    pollfds: Vec<libc::pollfd>,
}

fn socket_config(opts: &XskOptions, zero_copy: bool) -> Result<SocketConfig> {
    let q = QueueSize::new(opts.ring_size).xsk(|| "ring size".into())?;
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
    let q = QueueSize::new(opts.ring_size).xsk(|| "ring size".into())?;
    UmemConfig::builder()
        .frame_size(FrameSize::new(opts.frame_size).xsk(|| "frame size".into())?)
        .fill_queue_size(q)
        .comp_queue_size(q)
        .build()
        .xsk(|| "UMEM config".into())
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

impl Rings {
    /// Creates the UMEM and one socket per port on `queue`. `ports` are
    /// (port index, interface name), in port order (index i at position
    /// i). Zero-copy is decided once: all sockets on one UMEM share the
    /// first socket's mode. The fill rings are stocked before returning,
    /// so the first frames have somewhere to land once XDP redirects.
    pub fn new(worker: usize, queue: u32, ports: &[(u16, String)], opts: XskOptions) -> Result<Rings> {
        opts.validate().map_err(Error::config)?;
        if ports.iter().enumerate().any(|(i, (p, _))| *p as usize != i) {
            return Err(Error::Xsk("worker ports must be given in port order".into()));
        }
        let zero_copy = match opts.bind {
            BindMode::Copy => false,
            BindMode::ZeroCopy => true,
            BindMode::Auto => ports.iter().all(|(_, n)| probe_zero_copy(n, queue, &opts)),
        };
        let frames = (ports.len() as u32) * opts.ring_size * 2;
        let (umem, descs) = Umem::new(umem_config(&opts)?, NonZeroU32::new(frames).unwrap(), false)
            .xsk(|| format!("worker {worker}: creating a UMEM of {frames} frames"))?;
        let sc = socket_config(&opts, zero_copy)?;
        let mut socks = Vec::with_capacity(ports.len());
        for (port, ifname) in ports {
            let iface = ifname.parse().xsk(|| format!("interface name {ifname:?}"))?;
            // SAFETY: each (interface, queue) pair is bound once per UMEM,
            // and libxdp is told not to load a program of its own.
            let (tx, rx, fq) = unsafe { Socket::new(sc, &umem, &iface, queue) }.xsk(|| {
                format!(
                    "binding an AF_XDP socket to {ifname} queue {queue} ({} mode)",
                    if zero_copy { "zero-copy" } else { "copy" }
                )
            })?;
            let (fill, comp) =
                fq.ok_or_else(|| Error::Xsk(format!("{ifname} queue {queue}: bound twice on one UMEM")))?;
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
        let pollfds = socks
            .iter()
            .map(|s| libc::pollfd {
                fd: s.rx.fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let mut r = Rings {
            opts,
            zero_copy,
            umem,
            free: descs,
            socks,
            pollfds,
        };
        r.refill();
        Ok(r)
    }

    pub fn zero_copy(&self) -> bool {
        self.zero_copy
    }

    /// The socket and loop tuning these rings were made with.
    pub fn opts(&self) -> &XskOptions {
        &self.opts
    }

    /// How many ports (sockets) this worker has.
    pub fn ports(&self) -> usize {
        self.socks.len()
    }

    /// The UMEM, to reach a frame's bytes by its descriptor.
    pub fn umem(&self) -> &Umem {
        &self.umem
    }

    /// Takes up to `descs.len()` received frames from port `i`'s RX ring.
    pub fn receive(&mut self, i: usize, descs: &mut [FrameDesc]) -> usize {
        // SAFETY: descs are plain slots the RX ring writes into; the frames
        // they name are ours until staged or recycled.
        unsafe { self.socks[i].rx.consume(descs) }
    }

    /// Queues a frame for TX on `port` this turn; false (and the frame is
    /// recycled) if there is no such port.
    #[inline]
    pub fn stage(&mut self, port: usize, d: FrameDesc) -> bool {
        match self.socks.get_mut(port) {
            Some(s) => {
                s.stage.push(d);
                true
            }
            None => {
                self.free.push(d);
                false
            }
        }
    }

    /// Returns a frame that goes nowhere to the free list.
    #[inline]
    pub fn recycle(&mut self, d: FrameDesc) {
        self.free.push(d);
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

    /// Interface names, in port order.
    pub fn ifnames(&self) -> impl Iterator<Item = &str> {
        self.socks.iter().map(|s| s.ifname.as_str())
    }

    /// Busy polling on every socket (from the worker's own thread).
    pub fn set_busy_poll(&self) {
        for s in &self.socks {
            set_busy_poll(s.rx.fd().as_raw_fd(), self.opts.batch_size);
        }
    }

    /// Submits every staged frame; what does not fit the ring is dropped.
    /// The kernel is kicked once enough frames wait (or when `force`):
    /// under load frames arrive a few per loop, and a sendto() per few
    /// frames would cost more than the frames themselves.
    pub fn transmit(&mut self, tally: &mut Tally, force: bool) {
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
                if self.zero_copy {
                    break;
                }
            }
            s.unkicked = 0;
            s.unkicked_loops = 0;
        }
    }

    /// Without XDP_USE_NEED_WAKEUP on the socket (busy polling, or
    /// NeedWakeup off) the ring flag is never set: always kick.
    fn kick_always(&self) -> bool {
        !self.opts.need_wakeup || self.opts.busy_poll
    }

    /// Takes completed TX frames back.
    pub fn reclaim(&mut self, scratch: &mut [FrameDesc]) {
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
    pub fn refill(&mut self) {
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

    pub fn idle(&mut self, tally: &mut Tally) {
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
        unsafe { libc::poll(self.pollfds.as_mut_ptr(), self.pollfds.len() as libc::nfds_t, 50) };
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
    /// The sum of two sockets' counters.
    pub fn plus(&self, o: &XskStats) -> XskStats {
        XskStats {
            rx_dropped: self.rx_dropped + o.rx_dropped,
            rx_invalid_descs: self.rx_invalid_descs + o.rx_invalid_descs,
            tx_invalid_descs: self.tx_invalid_descs + o.tx_invalid_descs,
            rx_ring_full: self.rx_ring_full + o.rx_ring_full,
            rx_fill_ring_empty: self.rx_fill_ring_empty + o.rx_fill_ring_empty,
            tx_ring_empty: self.tx_ring_empty + o.tx_ring_empty,
        }
    }

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
