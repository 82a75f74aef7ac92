//! `subway capture`: what the workers forward, as a pcapng stream that
//! tcpdump and Wireshark read.
//!
//! The CLI sends a [`CaptureRequest`] on the control socket. The control
//! thread checks it (interface, peer, filter compiled by libpcap), starts
//! a tap on the workers (dataplane/src/capture.rs) and hands the
//! connection to a thread of its own ([`Session::run`]), which answers
//! one JSON line, then streams pcapng: a section header, an interface
//! block per captured port, a packet block per frame (direction flag,
//! worker and peer in its comment), and at the end an interface
//! statistics block per port with the frames the capture dropped. The
//! capture ends after COUNT frames, after the duration, when the client
//! shuts its side (Ctrl-C) or goes away, or when it reads too slowly for
//! [`STALLED`]; the workers stop copying at once.
//!
//! The CLI writes the stream to a file or stdout (`-w -`) unchanged, and
//! reads the statistics blocks as they pass to print the totals.

use crate::config::Config;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};
use subway_dataplane::Dataplane;
use subway_dataplane::capture::{CaptureHook, CaptureSpec, Direction, Filter, Record, Tap};

/// Which side of the tunnel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// LAN ports and the uplink.
    #[default]
    Both,
    /// LAN ports: the plaintext side.
    Inner,
    /// The uplink: WireGuard datagrams.
    Outer,
}

/// What to capture, as the CLI asks it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureRequest {
    /// One port (a [Lan] interface or the uplink); default: all.
    #[serde(default)]
    pub interface: Option<String>,
    /// Only frames from or to this peer (its public key, base64).
    #[serde(default)]
    pub peer: Option<String>,
    #[serde(default)]
    pub side: Side,
    /// Stop after this many frames.
    #[serde(default)]
    pub count: Option<u64>,
    /// Stop after this long.
    #[serde(default)]
    pub duration_ms: Option<u64>,
    /// Bytes kept per frame (default: the whole frame).
    #[serde(default)]
    pub snaplen: Option<u32>,
    /// tcpdump's filter language; empty: every frame.
    #[serde(default)]
    pub filter: String,
}

/// Frames in flight per worker between the worker and the writer: at 2 KiB
/// each, 2 MiB per worker, allocated when the capture starts.
const SLOTS: usize = 1024;
/// A client that takes nothing for this long ends the capture.
const STALLED: Duration = Duration::from_secs(5);
/// The writer's nap when the workers copied nothing.
const IDLE: Duration = Duration::from_millis(1);

/// A started capture, waiting for its connection.
pub struct Session {
    hook: Arc<CaptureHook>,
    tap: Arc<Tap>,
    /// (port index, interface name) captured, in interface-id order.
    ports: Vec<(u16, String)>,
    /// Peer id -> short name (the key's first characters) for comments.
    peers: Vec<String>,
    count: Option<u64>,
    duration: Option<Duration>,
}

/// Checks `req` against the running instance and starts the tap.
pub fn start(cfg: &Config, dp: &Dataplane, req: &CaptureRequest) -> Result<Session, String> {
    let tables = dp.tables();
    let names: Vec<&str> = tables.ports.iter().map(|p| p.name.as_str()).collect();
    let mut ports: Vec<(u16, String)> = tables
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| (i as u16, p.name.clone()))
        .filter(|(i, _)| match req.side {
            Side::Both => true,
            Side::Inner => tables.uplink != Some(*i),
            Side::Outer => tables.uplink == Some(*i),
        })
        .collect();
    if let Some(want) = &req.interface {
        if !names.contains(&want.as_str()) {
            return Err(format!(
                "{want} is not one of this instance's ports ({}); the kernel's own interfaces are seen by tcpdump itself",
                names.join(", ")
            ));
        }
        ports.retain(|(_, n)| n == want);
    }
    if ports.is_empty() {
        return Err(match req.side {
            Side::Outer if tables.uplink.is_none() => "--outer: this instance has no uplink (no peers)".into(),
            Side::Outer => "--outer captures the uplink, and the interface asked for is a LAN".into(),
            _ => "--inner captures the LANs, and the interface asked for is the uplink".into(),
        });
    }
    if ports.iter().any(|(i, _)| *i >= 64) {
        return Err("capture supports ports 0 to 63".into());
    }
    let peer = match &req.peer {
        None => None,
        Some(key) => Some(
            cfg.peers
                .iter()
                .find(|p| p.public_key.to_base64() == key.trim())
                .map(|p| p.id)
                .ok_or_else(|| format!("no peer has the public key {key} (`wg show` lists them)"))?,
        ),
    };
    let frame = cfg.tuning.xsk.frame_size;
    let snaplen = req.snaplen.unwrap_or(frame).clamp(64, frame);
    let filter = Filter::compile(&req.filter, snaplen)?;
    let spec = CaptureSpec {
        ports: ports.iter().fold(0u64, |m, (i, _)| m | 1 << i),
        peer,
        snaplen,
        slots: SLOTS,
    };
    let (hook, tap) = dp.start_capture(spec, filter).map_err(|e| e.to_string())?;
    let mut peers = vec![String::new(); cfg.peers.iter().map(|p| p.id as usize + 1).max().unwrap_or(0)];
    for p in &cfg.peers {
        peers[p.id as usize] = p.public_key.to_base64()[..8].to_string();
    }
    Ok(Session {
        hook,
        tap,
        ports,
        peers,
        count: req.count.filter(|c| *c > 0),
        duration: req.duration_ms.map(Duration::from_millis),
    })
}

/// The first line of the answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct Started {
    pub interfaces: Vec<String>,
    pub filter: String,
    pub snaplen: u32,
}

/// Why a capture ended.
enum End {
    Count,
    Time,
    Client,
    Stalled,
}

impl Session {
    /// Streams the capture to `stream` until it ends; the tap is removed
    /// on every way out.
    pub fn run(self, mut stream: UnixStream) {
        struct Stop<'a>(&'a CaptureHook, &'a Arc<Tap>);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.remove(self.1);
            }
        }
        let stop = Stop(&self.hook, &self.tap);
        let _ = stream.set_write_timeout(Some(STALLED));
        let started = Started {
            interfaces: self.ports.iter().map(|(_, n)| n.clone()).collect(),
            filter: self.tap.filter().text().to_string(),
            snaplen: self.tap.spec().snaplen,
        };
        let t0 = now_ns();
        let line = serde_json::json!({ "capturing": started }).to_string() + "\n";
        if stream.write_all(line.as_bytes()).is_err() {
            return;
        }
        // Only whole blocks from here: their padding is relative to 0.
        let mut out = Vec::with_capacity(64 * 1024);
        pcapng::section(&mut out);
        for (_, name) in &self.ports {
            pcapng::interface(&mut out, name, self.tap.spec().snaplen);
        }
        let mut ids = [u32::MAX; 64];
        for (id, (port, _)) in self.ports.iter().enumerate() {
            ids[*port as usize] = id as u32;
        }
        let deadline = self.duration.map(|d| Instant::now() + d);
        let mut written = 0u64;
        let mut delivered = vec![0u64; self.ports.len()];
        let end = loop {
            let room = self.count.map_or(usize::MAX, |c| (c - written) as usize);
            let n = self.tap.drain(room, |r: &Record| {
                let id = ids[r.port as usize];
                let peer = r.peer.and_then(|p| self.peers.get(p as usize)).map(String::as_str);
                pcapng::packet(&mut out, id, r, peer);
                if let Some(d) = delivered.get_mut(id as usize) {
                    *d += 1;
                }
            });
            written += n as u64;
            if !out.is_empty() {
                if stream.write_all(&out).is_err() {
                    break End::Stalled;
                }
                out.clear();
            }
            if self.count.is_some_and(|c| written >= c) {
                break End::Count;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break End::Time;
            }
            if client_gone(&stream) {
                break End::Client;
            }
            if n == 0 {
                std::thread::sleep(IDLE);
            }
        };
        drop(stop);
        // Frames copied after the last drain are not written: the
        // statistics count what was delivered.
        let t1 = now_ns();
        for (id, (port, _)) in self.ports.iter().enumerate() {
            pcapng::statistics(&mut out, id as u32, t0, t1, self.tap.dropped(*port), delivered[id]);
        }
        let _ = stream.write_all(&out);
        let why = match end {
            End::Count => "count reached",
            End::Time => "duration over",
            End::Client => "client stopped",
            End::Stalled => "client not reading",
        };
        tracing::info!(frames = written, "capture ended: {why}");
    }
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Whether the client shut its side (Ctrl-C) or closed the connection.
fn client_gone(s: &UnixStream) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: a non-blocking recv of at most one byte into `b`.
    let r = unsafe { libc::recv(s.as_raw_fd(), b.as_mut_ptr().cast(), 1, libc::MSG_DONTWAIT) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
        );
    }
    true
}

/// pcapng (draft-ietf-opsawg-pcapng), the blocks subway writes, in host
/// byte order (the section header says which).
pub mod pcapng {
    use super::{Direction, Record};

    pub const SHB: u32 = 0x0A0D_0D0A;
    pub const IDB: u32 = 1;
    pub const ISB: u32 = 5;
    pub const EPB: u32 = 6;
    /// isb_osdrop: frames the capture lost (its buffer was full).
    pub const ISB_OSDROP: u16 = 7;
    const OPT_END: u16 = 0;
    const OPT_COMMENT: u16 = 1;

    fn opt(b: &mut Vec<u8>, code: u16, v: &[u8]) {
        b.extend_from_slice(&code.to_ne_bytes());
        b.extend_from_slice(&(v.len() as u16).to_ne_bytes());
        b.extend_from_slice(v);
        b.resize(b.len().next_multiple_of(4), 0);
    }

    /// A block: type, length, `body` (built by the closure, padded), length.
    /// `out` holds whole blocks only, so 4-byte padding is to its length.
    fn block(out: &mut Vec<u8>, kind: u32, body: impl FnOnce(&mut Vec<u8>)) {
        let start = out.len();
        debug_assert!(start.is_multiple_of(4));
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&[0; 4]);
        body(out);
        out.resize(out.len().next_multiple_of(4), 0);
        let len = (out.len() - start + 4) as u32;
        out[start + 4..start + 8].copy_from_slice(&len.to_ne_bytes());
        out.extend_from_slice(&len.to_ne_bytes());
    }

    fn ts(b: &mut Vec<u8>, ns: u64) {
        b.extend_from_slice(&((ns >> 32) as u32).to_ne_bytes());
        b.extend_from_slice(&(ns as u32).to_ne_bytes());
    }

    pub fn section(out: &mut Vec<u8>) {
        block(out, SHB, |b| {
            b.extend_from_slice(&0x1A2B_3C4Du32.to_ne_bytes());
            b.extend_from_slice(&1u16.to_ne_bytes());
            b.extend_from_slice(&0u16.to_ne_bytes());
            b.extend_from_slice(&(-1i64).to_ne_bytes());
            let app = format!("subway {}", env!("CARGO_PKG_VERSION"));
            opt(b, 4, app.as_bytes()); // shb_userappl
            opt(b, OPT_END, &[]);
        });
    }

    /// An Ethernet interface with nanosecond timestamps.
    pub fn interface(out: &mut Vec<u8>, name: &str, snaplen: u32) {
        block(out, IDB, |b| {
            b.extend_from_slice(&1u16.to_ne_bytes()); // LINKTYPE_ETHERNET
            b.extend_from_slice(&0u16.to_ne_bytes());
            b.extend_from_slice(&snaplen.to_ne_bytes());
            opt(b, 2, name.as_bytes()); // if_name
            opt(b, 9, &[9]); // if_tsresol: 10^-9
            opt(b, OPT_END, &[]);
        });
    }

    pub fn packet(out: &mut Vec<u8>, interface: u32, r: &Record, peer: Option<&str>) {
        block(out, EPB, |b| {
            b.extend_from_slice(&interface.to_ne_bytes());
            ts(b, r.ts_ns);
            b.extend_from_slice(&r.caplen.to_ne_bytes());
            b.extend_from_slice(&r.len.to_ne_bytes());
            b.extend_from_slice(&r.data[..r.caplen as usize]);
            b.resize(b.len().next_multiple_of(4), 0);
            let flags: u32 = match r.direction {
                Direction::In => 1,
                Direction::Out => 2,
            };
            opt(b, 2, &flags.to_ne_bytes()); // epb_flags: inbound / outbound
            let comment = match peer {
                Some(p) => format!("worker {} peer {p}", r.worker),
                None => format!("worker {}", r.worker),
            };
            opt(b, OPT_COMMENT, comment.as_bytes());
            opt(b, OPT_END, &[]);
        });
    }

    pub fn statistics(out: &mut Vec<u8>, interface: u32, start_ns: u64, end_ns: u64, dropped: u64, delivered: u64) {
        block(out, ISB, |b| {
            b.extend_from_slice(&interface.to_ne_bytes());
            ts(b, end_ns);
            let mut t = Vec::new();
            ts(&mut t, start_ns);
            opt(b, 2, &t); // isb_starttime
            t.clear();
            ts(&mut t, end_ns);
            opt(b, 3, &t); // isb_endtime
            opt(b, ISB_OSDROP, &dropped.to_ne_bytes());
            opt(b, 8, &delivered.to_ne_bytes()); // isb_usrdeliv
            opt(
                b,
                OPT_COMMENT,
                b"isb_osdrop: frames subway's capture dropped (its buffer was full)",
            );
            opt(b, OPT_END, &[]);
        });
    }

    /// Reads one block from `r`: (type, whole block), None at the end.
    pub fn read_block(r: &mut impl std::io::Read) -> std::io::Result<Option<(u32, Vec<u8>)>> {
        let mut head = [0u8; 8];
        match r.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let kind = u32::from_ne_bytes(head[..4].try_into().unwrap());
        let len = u32::from_ne_bytes(head[4..].try_into().unwrap()) as usize;
        if !(12..=1 << 20).contains(&len) || !len.is_multiple_of(4) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not a pcapng block (length {len})"),
            ));
        }
        let mut b = head.to_vec();
        b.resize(len, 0);
        r.read_exact(&mut b[8..])?;
        Ok(Some((kind, b)))
    }

    /// The value of option `code` in a block whose options start at `at`.
    pub fn option(block: &[u8], at: usize, code: u16) -> Option<&[u8]> {
        let mut i = at;
        while i + 4 <= block.len().saturating_sub(4) {
            let c = u16::from_ne_bytes([block[i], block[i + 1]]);
            let l = u16::from_ne_bytes([block[i + 2], block[i + 3]]) as usize;
            if c == OPT_END {
                return None;
            }
            if c == code {
                return block.get(i + 4..i + 4 + l);
            }
            i += 4 + l.next_multiple_of(4);
        }
        None
    }
}

/// The CLI's side: `subway capture NAME ... -w FILE [FILTER]`.
pub fn client(name: &str, req: &CaptureRequest, write: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::{Context, bail};
    let path = crate::ctl::socket_path(name);
    let mut s = UnixStream::connect(&path)
        .with_context(|| format!("{}: is `subway run` running for {name}?", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("{}\n", crate::protocol::Request::Capture(req.clone()).to_line()).as_bytes())?;
    let mut r = std::io::BufReader::new(s.try_clone()?);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut r, &mut line).context("reading the instance's answer")?;
    let v: serde_json::Value =
        serde_json::from_str(&line).with_context(|| format!("instance {name} sent invalid JSON: {line:?}"))?;
    if let Some(e) = v.get("error") {
        bail!("{}", e.as_str().unwrap_or("error"));
    }
    let started: Started = serde_json::from_value(v["capturing"].clone()).context("the instance's answer")?;
    // From here frames may be minutes apart.
    s.set_read_timeout(None)?;
    let to_stdout = write.as_os_str() == "-";
    let mut out: Box<dyn Write> = if to_stdout {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::io::BufWriter::new(
            std::fs::File::create(write).with_context(|| format!("creating {}", write.display()))?,
        ))
    };
    eprintln!(
        "subway capture: {} on {}{}, Ctrl-C to stop",
        if started.filter.is_empty() {
            "every frame".to_string()
        } else {
            format!("filter {:?}", started.filter)
        },
        started.interfaces.join(", "),
        if to_stdout {
            String::new()
        } else {
            format!(", writing {}", write.display())
        }
    );
    stop_on_interrupt(&s);
    let (mut frames, mut dropped) = (0u64, 0u64);
    while let Some((kind, block)) = pcapng::read_block(&mut r)? {
        match kind {
            pcapng::EPB => frames += 1,
            pcapng::ISB => {
                // Interface id, timestamp (12 bytes), then options.
                if let Some(v) = pcapng::option(&block, 20, pcapng::ISB_OSDROP) {
                    dropped += u64::from_ne_bytes(v.try_into().unwrap_or([0; 8]));
                }
            }
            _ => {}
        }
        if out.write_all(&block).is_err() {
            // The reader of stdout is gone (`| head`): stop the capture.
            let _ = s.shutdown(std::net::Shutdown::Both);
            break;
        }
        if to_stdout && kind == pcapng::EPB {
            let _ = out.flush();
        }
    }
    let _ = out.flush();
    eprintln!("{frames} packets captured");
    eprintln!("{dropped} packets dropped by subway's capture (its buffer was full)");
    let _ = r.read(&mut [0u8; 1]);
    Ok(())
}

/// The connection's fd, for the signal handler.
static CONN: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_interrupt(_: libc::c_int) {
    let fd = CONN.load(std::sync::atomic::Ordering::Relaxed);
    if fd >= 0 {
        // SAFETY: shutdown is async-signal-safe; the instance sees the end
        // of our side, writes its statistics and closes.
        unsafe { libc::shutdown(fd, libc::SHUT_WR) };
    }
}

/// Ctrl-C (or SIGTERM) ends the capture cleanly: the statistics still
/// arrive and the file is complete.
fn stop_on_interrupt(s: &UnixStream) {
    CONN.store(s.as_raw_fd(), std::sync::atomic::Ordering::Relaxed);
    let h = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only makes an async-signal-safe call.
    unsafe {
        libc::signal(libc::SIGINT, h);
        libc::signal(libc::SIGTERM, h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(len: usize) -> Record {
        Record {
            ts_ns: 1_700_000_000_123_456_789,
            port: 1,
            direction: Direction::Out,
            worker: 0,
            peer: Some(2),
            len: len as u32 + 100,
            caplen: len as u32,
            data: (0..len as u8).collect::<Vec<u8>>().into_boxed_slice(),
        }
    }

    #[test]
    fn pcapng_blocks_are_well_formed_and_read_back() {
        let mut out = Vec::new();
        pcapng::section(&mut out);
        pcapng::interface(&mut out, "lan0", 2048);
        pcapng::packet(&mut out, 0, &record(61), Some("abcdEFGH"));
        pcapng::statistics(&mut out, 0, 1, 2, 42, 1);
        let mut r = std::io::Cursor::new(&out);
        let mut kinds = Vec::new();
        while let Some((kind, b)) = pcapng::read_block(&mut r).unwrap() {
            assert_eq!(b.len() % 4, 0);
            let tail = u32::from_ne_bytes(b[b.len() - 4..].try_into().unwrap());
            assert_eq!(tail as usize, b.len(), "trailing length of block {kind:#x}");
            if kind == pcapng::EPB {
                assert_eq!(u32::from_ne_bytes(b[20..24].try_into().unwrap()), 61);
                assert_eq!(u32::from_ne_bytes(b[24..28].try_into().unwrap()), 161);
                assert_eq!(&b[28..28 + 61], &record(61).data[..]);
                let flags = pcapng::option(&b, 28 + 64, 2).unwrap();
                assert_eq!(u32::from_ne_bytes(flags.try_into().unwrap()), 2);
                assert_eq!(pcapng::option(&b, 28 + 64, 1).unwrap(), b"worker 0 peer abcdEFGH");
            }
            if kind == pcapng::ISB {
                let d = pcapng::option(&b, 20, pcapng::ISB_OSDROP).unwrap();
                assert_eq!(u64::from_ne_bytes(d.try_into().unwrap()), 42);
            }
            kinds.push(kind);
        }
        assert_eq!(kinds, vec![pcapng::SHB, pcapng::IDB, pcapng::EPB, pcapng::ISB]);
        assert!(pcapng::read_block(&mut std::io::Cursor::new([1u8, 0, 0, 0, 7, 0, 0, 0])).is_err());
    }
}
