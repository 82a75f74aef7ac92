//! subway-pktgen: a pktgen-style UDP generator on an AF_XDP socket.
//!
//! Frames are built once in the UMEM; the send loop only stamps a sequence
//! number and recycles completed frames, so one core offers far more than
//! a socket-based sender. Bounded by --count and --duration, optionally
//! rate-limited. Prints one JSON line with what it sent.
//!
//! With `--wg-key` it is a WireGuard peer instead, for measuring a
//! gateway's decrypt direction without an encrypting gateway in front: it
//! makes a real handshake with the gateway (subway's own engine, over a
//! UDP socket), seals `--count` packets of that session with consecutive
//! counters before the clock starts, one UMEM frame each, and then sends
//! each exactly once (a counter cannot be replayed), so the send loop
//! costs what it costs for plain UDP.

use anyhow::{Context, Result, bail};
use clap::Parser;
use std::io::Write;
use std::net::Ipv4Addr;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};
use subway_bench::frames::{self, FlowSpec, Size};
use subway_dataplane::wire::MacAddr;
use xsk_rs::config::{BindFlags, FrameSize, LibxdpFlags, QueueSize, SocketConfig, UmemConfig};
use xsk_rs::{FrameDesc, Socket, Umem};

#[derive(Parser, Debug)]
#[command(about = "Send UDP test frames from an AF_XDP socket, bounded in count and time")]
struct Args {
    /// Interface to send from (must be one a test or benchmark created).
    #[arg(long)]
    iface: String,
    /// Destination MAC (the next hop: the gateway's interface).
    #[arg(long)]
    dst_mac: String,
    #[arg(long)]
    src_ip: Ipv4Addr,
    #[arg(long)]
    dst_ip: Ipv4Addr,
    #[arg(long, default_value_t = 9)]
    dst_port: u16,
    /// Wire size in bytes (64..1518, with FCS) or imix (7:4:1 of 64/570/1518).
    #[arg(long, default_value = "64")]
    size: String,
    /// Frames to send at most.
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// Seconds to send at most.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Offered rate in packets per second; 0 means as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Distinct UDP source ports.
    #[arg(long, default_value_t = 1)]
    flows: u16,
    /// Distinct UDP destination ports (from --dst-port up): with more than
    /// one, every sent frame's ports are rewritten so that the flows
    /// (--flows x --dst-ports) come round-robin, beyond the 4096 frames
    /// the generator builds (sealed mode: one frame per packet, each with
    /// its flow).
    #[arg(long, default_value_t = 1)]
    dst_ports: u16,
    /// Distinct destination addresses, --dst-ip-step apart from --dst-ip
    /// up: the prebuilt frames cycle through them (at most one per frame:
    /// 4096), so traffic goes to that many routes (peers) round-robin.
    #[arg(long, default_value_t = 1)]
    dst_ips: u32,
    #[arg(long, default_value_t = 1)]
    dst_ip_step: u32,
    /// Core to pin to.
    #[arg(long)]
    core: Option<usize>,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    #[arg(long, default_value_t = 0)]
    queue: u32,
    /// Decrypt-direction mode: our WireGuard private key (base64). The
    /// inner packets go from --src-ip to --dst-ip; --dst-mac is the
    /// gateway's uplink MAC.
    #[arg(long)]
    wg_key: Option<String>,
    /// The gateway's public key (base64).
    #[arg(long)]
    wg_peer: Option<String>,
    /// Our outer address and port (bound for the handshake; the gateway
    /// must know it as our endpoint).
    #[arg(long)]
    wg_listen: Option<std::net::SocketAddrV4>,
    /// The gateway's outer address and port.
    #[arg(long)]
    wg_endpoint: Option<std::net::SocketAddrV4>,
}

fn key(b64: &str, what: &str) -> Result<[u8; 32]> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()
        .and_then(|v| v.try_into().ok())
        .with_context(|| format!("{what}: not a base64 WireGuard key"))
}

/// A WireGuard session with the gateway under test, made by a real
/// handshake over UDP.
fn handshake(
    private: [u8; 32],
    peer: [u8; 32],
    listen: std::net::SocketAddrV4,
    endpoint: std::net::SocketAddrV4,
) -> Result<subway_dataplane::wg::device::Device> {
    use subway_dataplane::wg::Now;
    use subway_dataplane::wg::device::{Device, Received};
    use subway_dataplane::wg::peer::PeerConfig;
    let mut dev = Device::new(private);
    dev.add_peer(&PeerConfig {
        public_key: peer,
        preshared_key: None,
        endpoint: Some(endpoint.into()),
        allowed_ips: vec!["0.0.0.0/0".parse().unwrap()],
        persistent_keepalive: None,
        vnet: 0,
    })
    .context("the gateway's key is our own")?;
    let sock = std::net::UdpSocket::bind(listen).with_context(|| format!("binding {listen}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(250)))?;
    let mut buf = [0u8; 2048];
    // Bounded: 20 initiations, 250 ms apart.
    for _ in 0..20 {
        let init = dev.initiate(0, Now::system()).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        sock.send_to(&init.datagram, endpoint)?;
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(250) {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            let mut msg = buf[..n].to_vec();
            if let Ok(Received::Send(outs)) = dev.receive(from, &mut msg, Now::system()) {
                for o in outs {
                    sock.send_to(&o.datagram, endpoint)?;
                }
            }
            if dev
                .peer(0)
                .is_some_and(|p| p.send_session(Now::system().mono).is_some())
            {
                return Ok(dev);
            }
        }
    }
    bail!("no handshake response from {endpoint} after 20 initiations (about 10 s)")
}

fn main() -> Result<()> {
    let a = Args::parse();
    if a.duration <= 0.0 || a.duration > 600.0 {
        bail!("--duration must be in (0, 600] seconds");
    }
    if let Some(c) = a.core {
        core_affinity::set_for_current(core_affinity::CoreId { id: c });
    }
    let size = Size::parse(&a.size).map_err(anyhow::Error::msg)?;
    let src_mac: MacAddr = std::fs::read_to_string(format!("/sys/class/net/{}/address", a.iface))
        .with_context(|| format!("no interface {}", a.iface))?
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("bad MAC on {}", a.iface))?;
    let dst_mac: MacAddr = a.dst_mac.parse().map_err(|_| anyhow::anyhow!("bad --dst-mac"))?;
    let spec = FlowSpec {
        src_mac,
        dst_mac,
        src_ip: a.src_ip,
        dst_ip: a.dst_ip,
        dst_port: a.dst_port,
        flows: a.flows.max(1),
    };

    let wg = match (&a.wg_key, &a.wg_peer, a.wg_listen, a.wg_endpoint) {
        (None, None, None, None) => None,
        (Some(k), Some(p), Some(l), Some(e)) => Some((key(k, "--wg-key")?, key(p, "--wg-peer")?, l, e)),
        _ => bail!("--wg-key, --wg-peer, --wg-listen and --wg-endpoint go together"),
    };
    // Each sealed frame is sent once: as many frames as packets (4 GB of
    // UMEM at most), none recycled.
    const MAX_SEALED: u64 = 2 << 20;
    if wg.is_some() && a.count > MAX_SEALED {
        bail!("--count is at most {MAX_SEALED} with --wg-key (one UMEM frame per sealed packet)");
    }
    let frames: u32 = if wg.is_some() { a.count.max(1) as u32 } else { 4096 };
    let ring = QueueSize::new(2048)?;
    let ucfg = UmemConfig::builder()
        .frame_size(FrameSize::new(2048)?)
        .fill_queue_size(ring)
        .comp_queue_size(ring)
        .build()?;
    let (umem, mut descs) = Umem::new(ucfg, NonZeroU32::new(frames).unwrap(), false).context("creating the UMEM")?;
    let zc = subway_dataplane::xsk::probe_zero_copy(&a.iface, a.queue, &Default::default());
    let scfg = SocketConfig::builder()
        .rx_queue_size(ring)
        .tx_queue_size(ring)
        .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
        .bind_flags(
            if zc {
                BindFlags::XDP_ZEROCOPY
            } else {
                BindFlags::XDP_COPY
            } | BindFlags::XDP_USE_NEED_WAKEUP,
        )
        .build();
    let iface = a.iface.parse()?;
    // SAFETY: a fresh UMEM bound once to this (interface, queue).
    let (mut tx, _rx, fq) =
        unsafe { Socket::new(scfg, &umem, &iface, a.queue) }.context("binding the AF_XDP socket")?;
    let (_fill, mut comp) = fq.context("no completion ring")?;

    // Build every frame once; remember each frame's length, which the
    // completion ring resets.
    let lens_cycle = size.frame_lens();
    let mut lens = vec![0usize; frames as usize];
    let mut scratch = [0u8; 2048];
    // Sealed: the inner frames are addressed as in plain mode, and only
    // their IP packet is sealed for the gateway (whose uplink MAC is
    // --dst-mac) and wrapped in UDP.
    let mut sealer = match wg {
        Some((private, peer, listen, endpoint)) => {
            Some((handshake(private, peer, listen, endpoint)?, listen, endpoint))
        }
        None => None,
    };
    let sealed = sealer.is_some();
    let now = subway_dataplane::wg::Now::system();
    let mut outer = [0u8; 2048];
    for (i, d) in descs.iter_mut().enumerate() {
        let spec = FlowSpec {
            dst_ip: Ipv4Addr::from(u32::from(spec.dst_ip).wrapping_add((i as u32 % a.dst_ips.max(1)) * a.dst_ip_step)),
            ..spec
        };
        let mut len = frames::build(
            &mut scratch,
            lens_cycle[i % lens_cycle.len()],
            &spec,
            (i % spec.flows as usize) as u16,
        );
        if a.dst_ports > 1 && sealed {
            // Each sealed frame is sent once: its flow is chosen here.
            let flows = spec.flows as usize;
            let dport = a.dst_port.wrapping_add(((i / flows) % a.dst_ports as usize) as u16);
            frames::set_ports(&mut scratch, 10000 + (i % flows) as u16, dport);
        }
        let mut frame = &scratch[..len];
        if let Some((dev, listen, endpoint)) = sealer.as_mut() {
            frames::stamp(&mut scratch[..len], i as u64);
            let o = dev
                .send(0, &scratch[14..len], now)
                .map_err(|e| anyhow::anyhow!("sealing: {e:?}"))?
                .context("no session to seal with")?;
            len = frames::wrap_udp(&mut outer, &spec, *listen, *endpoint, &o.datagram);
            frame = &outer[..len];
        }
        // SAFETY: the frame is ours (not on any ring yet).
        let mut data = unsafe { umem.data_mut(d) };
        data.cursor().write_all(frame)?;
        lens[d.addr() / 2048] = len;
    }
    // Sealed frames go in order (consecutive counters), once each.
    descs.reverse();
    let mut free: Vec<FrameDesc> = descs;
    let mut done = vec![FrameDesc::default(); 2048];

    // The harness starts its CPU accounting here (sealing is not timed).
    eprintln!("sending");
    let t0 = Instant::now();
    let t0_unix_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let limit = Duration::from_secs_f64(a.duration);
    let mut sent: u64 = 0;
    let mut in_flight = 0usize;
    while sent < a.count && t0.elapsed() < limit {
        // SAFETY: completions are frames we submitted.
        let n = unsafe { comp.consume(&mut done) };
        in_flight -= n;
        for d in &mut done[..n] {
            if sealed {
                // Its counter is spent: never sent again.
                continue;
            }
            // SAFETY: completed, so ours again; restore its length.
            let len = lens[d.addr() / 2048];
            let mut data = unsafe { umem.data_mut(d) };
            data.cursor().set_pos(len);
            free.push(*d);
        }
        let mut want = a.batch.min(free.len()).min((a.count - sent) as usize);
        if a.rate > 0 {
            let allowed = (t0.elapsed().as_secs_f64() * a.rate as f64) as u64;
            want = want.min(allowed.saturating_sub(sent) as usize);
        }
        if want == 0 {
            if in_flight > 0 {
                let _ = tx.wakeup();
            }
            // At low rates, sleep until shortly before the next packet is
            // due instead of spinning: the core is shared with what is
            // measured (latency runs), and a spinning generator would
            // steal its time slices. The last stretch is spun, so sends
            // stay within a few microseconds of their schedule.
            if a.rate > 0 && in_flight == 0 {
                let due = Duration::from_secs_f64((sent + 1) as f64 / a.rate as f64);
                let gap = due.saturating_sub(t0.elapsed());
                if gap > Duration::from_micros(150) {
                    std::thread::sleep(gap - Duration::from_micros(80));
                }
            }
            std::hint::spin_loop();
            continue;
        }
        let start = free.len() - want;
        if sealed {
            // The stack holds the next frames at its end, in reverse:
            // hand them to the ring in counter order.
            free[start..].reverse();
        } else {
            for (k, d) in free[start..].iter_mut().enumerate() {
                // SAFETY: a free frame, not on any ring.
                let mut data = unsafe { umem.data_mut(d) };
                let seq = sent + k as u64;
                frames::stamp(data.contents_mut(), seq);
                if a.dst_ports > 1 {
                    let flows = spec.flows as u64;
                    let sport = 10000 + (seq % flows) as u16;
                    let dport = a.dst_port.wrapping_add(((seq / flows) % a.dst_ports as u64) as u16);
                    frames::set_ports(data.contents_mut(), sport, dport);
                }
            }
        }
        // SAFETY: the frames are ours until completed.
        let put = unsafe { tx.produce(&free[start..]) };
        if sealed && put < want {
            // Back to stack order for what was not taken.
            free[start + put..].reverse();
            let rest: Vec<FrameDesc> = free[start + put..].to_vec();
            free.truncate(start);
            free.extend(rest);
        } else {
            free.truncate(start + (want - put));
        }
        sent += put as u64;
        in_flight += put;
        if tx.needs_wakeup() {
            let _ = tx.wakeup();
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    // The harness's CPU accounting ends here (the drain below is not timed).
    eprintln!("sent");
    // Let the last frames leave.
    let drain = Instant::now();
    while in_flight > 0 && drain.elapsed() < Duration::from_secs(1) {
        let _ = tx.wakeup();
        // SAFETY: as above.
        in_flight -= unsafe { comp.consume(&mut done) };
    }
    println!(
        "{{\"sent\":{sent},\"seconds\":{secs:.4},\"t0_unix_ns\":{t0_unix_ns},\"pps\":{:.0},\"size\":\"{}\",\"zero_copy\":{zc}}}",
        sent as f64 / secs,
        size.label()
    );
    Ok(())
}
