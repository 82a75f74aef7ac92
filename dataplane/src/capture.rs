//! `subway capture`: copies of the frames the workers receive and send,
//! for tcpdump. AF_XDP takes frames before the kernel's packet taps and
//! sends around them, so `tcpdump -i lan0` cannot see what the fast path
//! forwards; the workers copy it themselves, only while a capture runs.
//!
//! - The filter is tcpdump's language: libpcap compiles it (on the control
//!   thread, [`Filter::compile`]) and the workers run the compiled program
//!   on each frame at a tap point (`pcap_offline_filter`, an interpreter:
//!   no allocation, no lock, no syscall).
//! - A [`Tap`] holds, per worker, a pool of preallocated [`Record`]s on
//!   two bounded lock-free queues: `free` (the worker takes one, copies a
//!   matching frame into it) and `full` (the capture's reader takes them,
//!   writes them out and gives them back). When `free` is empty the frame
//!   is not copied and counted as dropped: a slow reader never slows
//!   forwarding, it loses capture frames.
//! - The workers find the tap through a [`CaptureHook`]: one relaxed load
//!   of a flag per turn when no capture runs.
//!
//! Tap points (worker.rs): every frame as it comes off a port's RX ring
//! (before a WireGuard datagram is opened in place), and every frame
//! staged for TX (after a packet for a peer is sealed). A port is a LAN
//! (plaintext, "inner") or the uplink (WireGuard datagrams, "outer").

use arc_swap::ArcSwapOption;
use crossbeam::queue::ArrayQueue;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// libpcap's filter compiler and interpreter (libpcap0.8). Six functions
/// of its stable C API; the `pcap` crate wraps capture handles we do not
/// use, and its program type is not `Sync`.
mod ffi {
    use std::ffi::{c_char, c_int, c_uint};

    #[repr(C)]
    pub struct PcapT {
        _opaque: [u8; 0],
    }

    #[repr(C)]
    pub struct BpfInsn {
        _code: u16,
        _jt: u8,
        _jf: u8,
        _k: u32,
    }

    #[repr(C)]
    pub struct BpfProgram {
        pub bf_len: c_uint,
        pub bf_insns: *mut BpfInsn,
    }

    #[repr(C)]
    pub struct PcapPkthdr {
        pub ts: libc::timeval,
        pub caplen: u32,
        pub len: u32,
    }

    pub const DLT_EN10MB: c_int = 1;
    pub const PCAP_NETMASK_UNKNOWN: u32 = 0xffff_ffff;

    #[link(name = "pcap")]
    unsafe extern "C" {
        pub fn pcap_open_dead(linktype: c_int, snaplen: c_int) -> *mut PcapT;
        pub fn pcap_close(p: *mut PcapT);
        pub fn pcap_geterr(p: *mut PcapT) -> *const c_char;
        pub fn pcap_compile(
            p: *mut PcapT,
            fp: *mut BpfProgram,
            s: *const c_char,
            optimize: c_int,
            netmask: u32,
        ) -> c_int;
        pub fn pcap_freecode(fp: *mut BpfProgram);
        pub fn pcap_offline_filter(fp: *const BpfProgram, h: *const PcapPkthdr, pkt: *const u8) -> c_int;
    }
}

/// A compiled tcpdump filter for Ethernet frames, or "everything".
pub struct Filter {
    /// None: the empty filter, which takes every frame.
    prog: Option<ffi::BpfProgram>,
    text: String,
}

// SAFETY: the program is immutable after compiling; pcap_offline_filter
// only reads it (libpcap's bpf_filter interpreter keeps its state on the
// stack), so any number of workers may run it at once.
unsafe impl Send for Filter {}
unsafe impl Sync for Filter {}

impl Filter {
    /// Compiles `expr` (tcpdump's filter language) for Ethernet frames of
    /// up to `snaplen` bytes; the error is libpcap's own message.
    pub fn compile(expr: &str, snaplen: u32) -> Result<Filter, String> {
        let text = expr.trim().to_string();
        if text.is_empty() {
            return Ok(Filter { prog: None, text });
        }
        let c = std::ffi::CString::new(text.as_str()).map_err(|_| "the filter contains a NUL byte".to_string())?;
        // SAFETY: a "dead" handle only serves to compile; closed below.
        let p = unsafe { ffi::pcap_open_dead(ffi::DLT_EN10MB, snaplen as i32) };
        if p.is_null() {
            return Err("libpcap could not make a handle to compile the filter".into());
        }
        let mut prog = ffi::BpfProgram {
            bf_len: 0,
            bf_insns: std::ptr::null_mut(),
        };
        // SAFETY: p is live, prog is ours, c is NUL-terminated.
        let r = unsafe { ffi::pcap_compile(p, &mut prog, c.as_ptr(), 1, ffi::PCAP_NETMASK_UNKNOWN) };
        let out = if r < 0 {
            // SAFETY: pcap_geterr returns the handle's NUL-terminated message.
            let msg = unsafe { std::ffi::CStr::from_ptr(ffi::pcap_geterr(p)) };
            Err(format!("filter {text:?}: {}", msg.to_string_lossy()))
        } else {
            Ok(Filter { prog: Some(prog), text })
        };
        // SAFETY: the program does not refer to the handle.
        unsafe { ffi::pcap_close(p) };
        out
    }

    /// The filter as given (empty: everything).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether `frame` (an Ethernet frame, `frame.len()` bytes on the wire)
    /// passes the filter.
    #[inline]
    pub fn matches(&self, frame: &[u8]) -> bool {
        let Some(prog) = &self.prog else { return true };
        let h = ffi::PcapPkthdr {
            ts: libc::timeval { tv_sec: 0, tv_usec: 0 },
            caplen: frame.len() as u32,
            len: frame.len() as u32,
        };
        // SAFETY: the program is valid until drop; the header says how
        // many bytes the interpreter may read from `frame`.
        unsafe { ffi::pcap_offline_filter(prog, &h, frame.as_ptr()) != 0 }
    }
}

impl Drop for Filter {
    fn drop(&mut self) {
        if let Some(p) = self.prog.as_mut() {
            // SAFETY: compiled by pcap_compile, freed once.
            unsafe { ffi::pcap_freecode(p) };
        }
    }
}

/// Received on a port, or sent out of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    In,
    Out,
}

/// One copied frame.
pub struct Record {
    /// Wall-clock time of the copy, in nanoseconds since the epoch.
    pub ts_ns: u64,
    pub port: u16,
    pub direction: Direction,
    pub worker: u16,
    /// The peer the frame came from or goes to, if any.
    pub peer: Option<u32>,
    /// The frame's length on the wire; `data[..caplen]` holds its start.
    pub len: u32,
    pub caplen: u32,
    pub data: Box<[u8]>,
}

/// What one capture takes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CaptureSpec {
    /// Port indices to capture on (bit i: port i).
    pub ports: u64,
    /// Only frames from or to this peer.
    pub peer: Option<u32>,
    /// Bytes copied per frame, at most.
    pub snaplen: u32,
    /// Records per worker (frames in flight between a worker and the reader).
    pub slots: usize,
}

/// One worker's share of a tap.
struct TapRing {
    free: ArrayQueue<Box<Record>>,
    full: ArrayQueue<Box<Record>>,
    /// Matching frames not copied (no free record), per port.
    dropped: Box<[AtomicU64]>,
}

/// A running capture, shared by the workers (writers) and its reader.
pub struct Tap {
    spec: CaptureSpec,
    filter: Filter,
    rings: Box<[TapRing]>,
}

impl Tap {
    /// Allocates every record up front (the workers never allocate).
    pub fn new(spec: CaptureSpec, filter: Filter, workers: usize, ports: usize) -> Tap {
        let slots = spec.slots.max(1);
        let rings = (0..workers)
            .map(|w| {
                let free = ArrayQueue::new(slots);
                for _ in 0..slots {
                    let _ = free.push(Box::new(Record {
                        ts_ns: 0,
                        port: 0,
                        direction: Direction::In,
                        worker: w as u16,
                        peer: None,
                        len: 0,
                        caplen: 0,
                        data: vec![0u8; spec.snaplen as usize].into_boxed_slice(),
                    }));
                }
                TapRing {
                    free,
                    full: ArrayQueue::new(slots),
                    dropped: (0..ports.max(1)).map(|_| AtomicU64::new(0)).collect(),
                }
            })
            .collect();
        Tap { spec, filter, rings }
    }

    pub fn spec(&self) -> &CaptureSpec {
        &self.spec
    }

    pub fn filter(&self) -> &Filter {
        &self.filter
    }

    /// Whether frames on `port` are captured.
    #[inline]
    pub fn on_port(&self, port: u16) -> bool {
        port < 64 && self.spec.ports & (1u64 << port) != 0
    }

    /// Worker `worker` saw `frame` on `port`: a copy of it if it is on a
    /// captured port and passes the filter (then [`Tap::commit`] it once
    /// its peer is known). A frame that matches when no record is free is
    /// counted as dropped.
    #[inline]
    pub fn copy(&self, worker: usize, port: u16, direction: Direction, frame: &[u8]) -> Option<Box<Record>> {
        if !self.on_port(port) || !self.filter.matches(frame) {
            return None;
        }
        let ring = self.rings.get(worker)?;
        let Some(mut r) = ring.free.pop() else {
            if let Some(d) = ring.dropped.get(port as usize) {
                d.fetch_add(1, Ordering::Relaxed);
            }
            return None;
        };
        let n = frame.len().min(r.data.len());
        r.data[..n].copy_from_slice(&frame[..n]);
        r.caplen = n as u32;
        r.len = frame.len() as u32;
        r.port = port;
        r.direction = direction;
        r.ts_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Some(r)
    }

    /// Hands a copied frame to the reader, or back to the pool if the
    /// capture is for another peer.
    #[inline]
    pub fn commit(&self, worker: usize, mut r: Box<Record>, peer: Option<u32>) {
        let Some(ring) = self.rings.get(worker) else { return };
        r.peer = peer;
        let keep = self.spec.peer.is_none() || self.spec.peer == peer;
        // Neither push can fail: the pool's records are in one queue or
        // the other (or in hand), and each queue holds all of them.
        let _ = if keep { ring.full.push(r) } else { ring.free.push(r) };
    }

    /// Reader: takes up to `max` copied frames, oldest first per worker,
    /// and gives each to `f`, then back to its worker's pool.
    pub fn drain(&self, max: usize, mut f: impl FnMut(&Record)) -> usize {
        let mut n = 0;
        for ring in self.rings.iter() {
            while n < max {
                let Some(r) = ring.full.pop() else { break };
                f(&r);
                let _ = ring.free.push(r);
                n += 1;
            }
        }
        n
    }

    /// Frames dropped by the capture (no free record), per port.
    pub fn dropped(&self, port: u16) -> u64 {
        self.rings
            .iter()
            .filter_map(|r| r.dropped.get(port as usize))
            .map(|d| d.load(Ordering::Relaxed))
            .sum()
    }
}

/// Where the workers look for a running capture.
#[derive(Default)]
pub struct CaptureHook {
    active: AtomicBool,
    tap: ArcSwapOption<Tap>,
}

impl CaptureHook {
    /// The running capture, if any: a relaxed load when there is none.
    #[inline]
    pub fn current(&self) -> Option<Arc<Tap>> {
        if !self.active.load(Ordering::Relaxed) {
            return None;
        }
        self.tap.load_full()
    }

    /// Starts `tap`; refused while another capture runs.
    pub fn install(&self, tap: Arc<Tap>) -> Result<(), String> {
        let prev = self.tap.compare_and_swap(&None::<Arc<Tap>>, Some(tap));
        if prev.is_some() {
            return Err("another capture is running on this instance: one at a time".into());
        }
        self.active.store(true, Ordering::Release);
        Ok(())
    }

    /// Stops the capture `tap`; returns once no worker holds it (bounded:
    /// a worker lets go at the end of its turn), so that its memory is
    /// freed here, not on a worker.
    pub fn remove(&self, tap: &Arc<Tap>) {
        self.active.store(false, Ordering::Release);
        self.tap.store(None);
        let until = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while Arc::strong_count(tap) > 1 && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }

    pub fn running(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp_frame(dport: u16) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 8 + 4];
        f[12] = 0x08;
        f[14] = 0x45;
        let total = (f.len() - 14) as u16;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f[22] = 64;
        f[23] = 17;
        f[26..30].copy_from_slice(&[10, 0, 0, 1]);
        f[30..34].copy_from_slice(&[10, 0, 0, 2]);
        f[34..36].copy_from_slice(&1234u16.to_be_bytes());
        f[36..38].copy_from_slice(&dport.to_be_bytes());
        f[38..40].copy_from_slice(&12u16.to_be_bytes());
        f
    }

    #[test]
    fn libpcap_filters_frames_as_tcpdump_would() {
        let f = Filter::compile("udp port 443", 2048).unwrap();
        assert!(f.matches(&udp_frame(443)));
        assert!(!f.matches(&udp_frame(22)));
        let all = Filter::compile("  ", 2048).unwrap();
        assert!(all.matches(&udp_frame(22)));
        assert!(!Filter::compile("icmp", 2048).unwrap().matches(&udp_frame(443)));
        assert!(
            Filter::compile("host 10.0.0.2 and udp", 2048)
                .unwrap()
                .matches(&udp_frame(1))
        );
        let e = Filter::compile("port fish", 2048).err().unwrap();
        assert!(e.contains("port fish"), "{e}");
    }

    fn tap(ports: u64, peer: Option<u32>, slots: usize, filter: &str) -> Tap {
        let spec = CaptureSpec {
            ports,
            peer,
            snaplen: 40,
            slots,
        };
        Tap::new(spec, Filter::compile(filter, 40).unwrap(), 2, 3)
    }

    #[test]
    fn a_full_pool_drops_and_counts_and_never_blocks() {
        let t = tap(0b011, None, 2, "udp");
        let f = udp_frame(53);
        for _ in 0..5 {
            if let Some(r) = t.copy(0, 1, Direction::In, &f) {
                t.commit(0, r, Some(7));
            }
        }
        assert_eq!(t.dropped(1), 3);
        let mut seen = Vec::new();
        assert_eq!(t.drain(10, |r| seen.push((r.port, r.peer, r.len, r.caplen))), 2);
        assert_eq!(seen, vec![(1, Some(7), f.len() as u32, 40); 2]);
        // Records went back to the pool: more can be taken.
        assert!(t.copy(0, 1, Direction::Out, &f).is_some());
        // Port 2 is not captured; worker 1 has a pool of its own.
        assert!(t.copy(0, 2, Direction::In, &f).is_none());
        assert!(t.copy(1, 0, Direction::In, &f).is_some());
    }

    #[test]
    fn a_peer_capture_keeps_only_that_peers_frames() {
        let t = tap(1, Some(3), 4, "");
        for peer in [Some(3), None, Some(4), Some(3)] {
            let r = t.copy(0, 0, Direction::In, &udp_frame(1)).unwrap();
            t.commit(0, r, peer);
        }
        let mut peers = Vec::new();
        t.drain(10, |r| peers.push(r.peer));
        assert_eq!(peers, vec![Some(3), Some(3)]);
        // Nothing leaked: all four records are free again.
        let held: Vec<_> = (0..4)
            .filter_map(|_| t.copy(0, 0, Direction::In, &udp_frame(1)))
            .collect();
        assert_eq!(held.len(), 4);
    }

    #[test]
    fn one_capture_at_a_time_and_workers_see_none_after_removal() {
        let hook = CaptureHook::default();
        assert!(hook.current().is_none());
        let t = Arc::new(tap(1, None, 1, ""));
        hook.install(t.clone()).unwrap();
        assert!(hook.install(Arc::new(tap(1, None, 1, ""))).is_err());
        let held = hook.current().unwrap();
        assert!(Arc::ptr_eq(&held, &t));
        drop(held);
        hook.remove(&t);
        assert!(hook.current().is_none());
        assert_eq!(Arc::strong_count(&t), 1);
        hook.install(Arc::new(tap(1, None, 1, ""))).unwrap();
    }
}
