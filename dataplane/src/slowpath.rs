//! The slow path: a TUN device through which workers hand the kernel the
//! IP packets the fast path cannot finish (neighbour unknown, TTL expiring,
//! no route in the snapshot, VLAN). The kernel routes them as if they had
//! arrived on a wire, resolves ARP/NDP and sends ICMP errors; the
//! neighbour mirror then lets the next packet take the fast path.
//!
//! The device is not persistent: it disappears when the process exits,
//! even on a crash.
//!
//! The kernel has one routing table, so it serves only the default VNET.
//! Packets of other VNETs never enter it: those the control thread can
//! finish (a peer without a session yet, a LAN neighbour not resolved yet)
//! or must answer with an ICMP error (too big, TTL expiring) go to it
//! through a bounded queue ([`SlowPath::take_punted`]); the rest are
//! dropped and counted (`drop_vnet_no_kernel`).

use crate::fib::VnetId;
use crate::stats::Counter;
use crossbeam::queue::ArrayQueue;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// The VNET of a packet whose peer is not in the tables (a stale id): it
/// belongs nowhere and is dropped.
pub const NO_VNET: VnetId = u32::MAX - 1;

/// Packets of non-default VNETs waiting for the control thread.
const PUNT_QUEUE: usize = 1024;

/// The slow path's budget per VNET, all workers together: a packet the fast
/// path cannot finish costs a system call (a TUN write) or a copy to the
/// control thread, so a scan of a LAN prefix with no neighbours, or a flood
/// to a peer without a session, must not take the workers' time from the
/// traffic the fast path carries. Beyond it packets are dropped and counted
/// (`drop_slow_path_limited`).
pub const SLOW_PATH_PER_SEC: u64 = 20_000;
/// ...and the burst it allows (first packets of many flows at once).
pub const SLOW_PATH_BURST: u64 = 1_024;
/// VNETs with a budget of their own; higher ids (and the uplink) share the last.
const BUDGETS: usize = 64;

/// A GCRA token bucket on one atomic (the theoretical arrival time, in
/// nanoseconds): lock-free, shared by the workers, touched only by packets
/// that take the slow path.
struct Budget(std::sync::atomic::AtomicU64);

impl Budget {
    const INTERVAL: u64 = 1_000_000_000 / SLOW_PATH_PER_SEC;
    const TOLERANCE: u64 = Self::INTERVAL * SLOW_PATH_BURST;

    fn allow(&self, now: Duration) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let now = now.as_nanos() as u64;
        let mut tat = self.0.load(Relaxed);
        loop {
            let next = tat.max(now) + Self::INTERVAL;
            if next - now > Self::TOLERANCE {
                return false;
            }
            match self.0.compare_exchange_weak(tat, next, Relaxed, Relaxed) {
                Ok(_) => return true,
                Err(t) => tat = t,
            }
        }
    }
}

/// An IP packet of a non-default VNET that the fast path could not finish.
#[derive(Debug)]
pub struct Punted {
    pub vnet: VnetId,
    /// Why: `SlowNoSession`, `SlowNeighUnknown` (finished by the control
    /// thread), `SlowTooBig` or `SlowTtlExpired` (answered with ICMP).
    pub reason: Counter,
    pub packet: Vec<u8>,
}

/// A TUN device shared by every worker (each write is one packet), and the
/// queue of packets of other VNETs for the control thread.
pub struct SlowPath {
    fd: OwnedFd,
    name: String,
    punted: ArrayQueue<Punted>,
    /// An eventfd the workers signal when they punt, so that the control
    /// thread wakes at once instead of at its next timeout.
    punt_event: OwnedFd,
    /// Signalled since the control thread last drained: only the first
    /// punt after a drain writes the eventfd (one syscall per drain, not
    /// per packet).
    punt_signalled: std::sync::atomic::AtomicBool,
    budgets: [Budget; BUDGETS],
}

impl SlowPath {
    /// Creates TUN device `name`, brings it up and turns reverse-path
    /// filtering off on it (packets arrive with LAN source addresses).
    pub fn create(name: &str) -> io::Result<Self> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad TUN name {name:?}"),
            ));
        }
        let path = CString::new("/dev/net/tun").unwrap();
        // SAFETY: plain open(2) of a NUL-terminated path.
        let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TUN | IFF_NO_PI,
            _pad: [0; 22],
        };
        for (d, s) in req.name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        // SAFETY: TUNSETIFF reads an ifreq; req is one, correctly sized.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        set_up(name)?;
        let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{name}/rp_filter"), "0");
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "0");
        // SAFETY: plain eventfd(2); the fd is owned below.
        let ev = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if ev < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(SlowPath {
            fd,
            name: name.to_string(),
            punted: ArrayQueue::new(PUNT_QUEUE),
            budgets: std::array::from_fn(|_| Budget(std::sync::atomic::AtomicU64::new(0))),
            // SAFETY: ev is a fresh fd we own.
            punt_event: unsafe { OwnedFd::from_raw_fd(ev) },
            punt_signalled: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device's fd, for poll(); reading is the control thread's job.
    pub fn fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads one IP packet the kernel routed into the TUN (non-blocking).
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reads into a valid, writable slice from our own fd.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Hands one IP packet to the kernel. Non-blocking: a full queue is an
    /// error the caller counts.
    #[inline]
    pub fn send(&self, ip_packet: &[u8]) -> io::Result<()> {
        // SAFETY: writes from a valid slice to our own fd.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), ip_packet.as_ptr().cast(), ip_packet.len()) };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }
}

impl SlowPath {
    /// Hands an IP packet the fast path cannot finish to its [`taker`],
    /// within its VNET's budget, and returns the counter to add. The
    /// control thread is the slow path of the slow path (first packets of a
    /// flow in a non-default VNET): it copies the packet.
    pub fn hand_off(&self, vnet: VnetId, packet: &[u8], reason: Counter, now: Duration) -> Counter {
        let taker = taker(vnet, reason);
        if let Taker::Drop(c) = taker {
            return c;
        }
        if !self.budgets[(vnet as usize).min(BUDGETS - 1)].allow(now) {
            return Counter::DropSlowPathLimited;
        }
        if taker == Taker::Kernel {
            return if self.send(packet).is_ok() {
                reason
            } else {
                Counter::DropSlowPathFailed
            };
        }
        let p = Punted {
            vnet,
            reason,
            packet: packet.to_vec(),
        };
        match self.punted.push(p) {
            Ok(()) => {
                if !self.punt_signalled.swap(true, std::sync::atomic::Ordering::AcqRel) {
                    let one = 1u64.to_ne_bytes();
                    // SAFETY: an 8-byte write to our own eventfd.
                    unsafe { libc::write(self.punt_event.as_raw_fd(), one.as_ptr().cast(), 8) };
                }
                reason
            }
            Err(_) => Counter::DropPuntQueueFull,
        }
    }

    /// The next packet of a non-default VNET handed to the control thread.
    pub fn take_punted(&self) -> Option<Punted> {
        self.punted.pop()
    }

    /// The fd that becomes readable when packets are punted (for poll()).
    pub fn punt_fd(&self) -> std::os::fd::RawFd {
        self.punt_event.as_raw_fd()
    }

    /// Resets the punt signal (call before draining the queue: a punt
    /// after this signals again).
    pub fn clear_punt_signal(&self) {
        self.punt_signalled.store(false, std::sync::atomic::Ordering::Release);
        let mut b = [0u8; 8];
        // SAFETY: an 8-byte read from our own non-blocking eventfd.
        unsafe { libc::read(self.punt_event.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
    }

    /// Sets the TUN's MTU. For a gateway this is the tunnel's MTU, so that
    /// the kernel fragments, or answers "fragmentation needed" / "packet
    /// too big" for, what is too big for the tunnel.
    pub fn set_mtu(&self, mtu: u32) -> io::Result<()> {
        #[repr(C)]
        struct IfReqMtu {
            name: [libc::c_char; libc::IFNAMSIZ],
            mtu: libc::c_int,
            _pad: [u8; 20],
        }
        // SAFETY: an ordinary datagram socket used only for the ioctl below.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if s < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: s is a fresh fd we own.
        let s = unsafe { OwnedFd::from_raw_fd(s) };
        let mut req = IfReqMtu {
            name: [0; libc::IFNAMSIZ],
            mtu: mtu as libc::c_int,
            _pad: [0; 20],
        };
        for (d, c) in req.name.iter_mut().zip(self.name.bytes()) {
            *d = c as libc::c_char;
        }
        // SAFETY: SIOCSIFMTU takes an ifreq, which req is.
        if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFMTU, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Sets IFF_UP on an interface.
fn set_up(name: &str) -> io::Result<()> {
    #[repr(C)]
    struct IfReq {
        name: [libc::c_char; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    // SAFETY: an ordinary datagram socket used only for the ioctls below.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: s is a fresh fd we own.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    for (d, c) in req.name.iter_mut().zip(name.bytes()) {
        *d = c as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS / SIOCSIFFLAGS take an ifreq, which req is.
    unsafe {
        if libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Who finishes a packet the fast path handed on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taker {
    /// The kernel, through the slow-path TUN (the default VNET and the
    /// uplink: the kernel's routing table is theirs).
    Kernel,
    /// The control thread (other VNETs): it resolves neighbours, starts
    /// handshakes and answers ICMP errors in the VNET.
    ControlThread,
    /// Nobody: dropped under this counter.
    Drop(Counter),
}

/// Who takes a packet of `vnet` the fast path could not finish for
/// `reason`. The workers and `route explain` both ask this.
pub fn taker(vnet: VnetId, reason: Counter) -> Taker {
    if vnet == NO_VNET {
        return Taker::Drop(Counter::DropNoTunnel);
    }
    if vnet == 0 || vnet == crate::UPLINK_VNET {
        return Taker::Kernel;
    }
    match reason {
        Counter::SlowNoSession | Counter::SlowNeighUnknown | Counter::SlowTooBig | Counter::SlowTtlExpired => {
            Taker::ControlThread
        }
        _ => Taker::Drop(Counter::DropVnetNoKernel),
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    #[test]
    fn the_slow_path_budget_allows_a_burst_then_its_rate() {
        let b = Budget(std::sync::atomic::AtomicU64::new(0));
        let t = Duration::from_secs(100);
        let burst = (0..5_000).filter(|_| b.allow(t)).count() as u64;
        assert!((SLOW_PATH_BURST..=SLOW_PATH_BURST + 1).contains(&burst), "{burst}");
        assert!(!b.allow(t));
        // Offered without pause for the next second: the rate gets through.
        let mut more = 0u64;
        for ms in 1..=1000 {
            let now = t + Duration::from_millis(ms);
            more += (0..100).filter(|_| b.allow(now)).count() as u64;
        }
        assert!(more.abs_diff(SLOW_PATH_PER_SEC) <= 2, "{more}");
    }
}
