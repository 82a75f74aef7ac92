//! subway-pktgen: a pktgen-style UDP generator on an AF_XDP socket.
//!
//! Frames are built once in the UMEM; the send loop only stamps a sequence
//! number and recycles completed frames, so one core offers far more than
//! a socket-based sender. Bounded by --count and --duration, optionally
//! rate-limited. Prints one JSON line with what it sent.

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
    /// Core to pin to.
    #[arg(long)]
    core: Option<usize>,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    #[arg(long, default_value_t = 0)]
    queue: u32,
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

    const FRAMES: u32 = 4096;
    let ring = QueueSize::new(2048)?;
    let ucfg = UmemConfig::builder()
        .frame_size(FrameSize::new(2048)?)
        .fill_queue_size(ring)
        .comp_queue_size(ring)
        .build()?;
    let (umem, mut descs) = Umem::new(ucfg, NonZeroU32::new(FRAMES).unwrap(), false).context("creating the UMEM")?;
    let zc = subway_dataplane::worker::probe_zero_copy(&a.iface, a.queue, &Default::default());
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
    let mut lens = vec![0usize; FRAMES as usize];
    let mut scratch = [0u8; 2048];
    for (i, d) in descs.iter_mut().enumerate() {
        let len = frames::build(
            &mut scratch,
            lens_cycle[i % lens_cycle.len()],
            &spec,
            (i % spec.flows as usize) as u16,
        );
        // SAFETY: the frame is ours (not on any ring yet).
        let mut data = unsafe { umem.data_mut(d) };
        data.cursor().write_all(&scratch[..len])?;
        lens[d.addr() / 2048] = len;
    }
    let mut free: Vec<FrameDesc> = descs;
    let mut done = vec![FrameDesc::default(); 2048];

    let t0 = Instant::now();
    let limit = Duration::from_secs_f64(a.duration);
    let mut sent: u64 = 0;
    let mut in_flight = 0usize;
    while sent < a.count && t0.elapsed() < limit {
        // SAFETY: completions are frames we submitted.
        let n = unsafe { comp.consume(&mut done) };
        in_flight -= n;
        for d in &mut done[..n] {
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
            std::hint::spin_loop();
            continue;
        }
        let start = free.len() - want;
        for (k, d) in free[start..].iter_mut().enumerate() {
            // SAFETY: a free frame, not on any ring.
            let mut data = unsafe { umem.data_mut(d) };
            frames::stamp(data.contents_mut(), sent + k as u64);
        }
        // SAFETY: the frames are ours until completed.
        let put = unsafe { tx.produce(&free[start..]) };
        free.truncate(start + (want - put));
        sent += put as u64;
        in_flight += put;
        if tx.needs_wakeup() {
            let _ = tx.wakeup();
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    // Let the last frames leave.
    let drain = Instant::now();
    while in_flight > 0 && drain.elapsed() < Duration::from_secs(1) {
        let _ = tx.wakeup();
        // SAFETY: as above.
        in_flight -= unsafe { comp.consume(&mut done) };
    }
    println!(
        "{{\"sent\":{sent},\"seconds\":{secs:.4},\"pps\":{:.0},\"size\":\"{}\",\"zero_copy\":{zc}}}",
        sent as f64 / secs,
        size.label()
    );
    Ok(())
}
