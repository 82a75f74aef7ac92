//! `routed`: subway's routed mode (AF_XDP, no crypto) against the kernel's
//! own IPv4 forwarding, UDP at each packet size, generator on one core,
//! the forwarder on the other. The baseline is the kernel; subway's routed
//! mode is the AF_XDP ceiling the tunnel is measured against.

use super::rig::{Gen, SINK_IP, neigh_to_sink, offer};
use super::{Params, date_stamp, need_root, parse_sizes, search_loss_free, write_results};
use crate::frames::Size;
use crate::report::{self, Row};
use anyhow::{Result, bail};
use std::path::{Path, PathBuf};
use std::time::Duration;
use subway_testkit::{Subway, TwoSubnets, profile_bin};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Sizes (wire bytes) or imix, comma-separated.
    #[arg(long, default_value = "64,512,1420,imix")]
    sizes: String,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Frames per measurement at most.
    #[arg(long, default_value_t = 20_000_000)]
    count: u64,
    /// Offered rate in packets/s (0: as fast as the generator goes).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Core for the forwarder (subway's worker; the kernel's RX via RPS).
    #[arg(long, default_value_t = 0)]
    fwd_core: usize,
    /// Core for the generator.
    #[arg(long, default_value_t = 1)]
    gen_core: usize,
    /// Trials per contender and size (interleaved); the median is shown.
    #[arg(long, default_value_t = 3)]
    trials: usize,
    /// Smoke test: 64 bytes only, 1 second, 1 trial.
    #[arg(long)]
    quick: bool,
    /// Extra [Tuning] lines for subway, e.g. "IdleSpin = 512".
    #[arg(long, default_value = "")]
    tuning: String,
    /// Search for the highest rate with loss under 0.1% (RFC 2544
    /// style) instead of saturating.
    #[arg(long)]
    search: bool,
    /// Distinct flows (UDP source ports). On a multi-queue NIC RSS
    /// spreads them over queues and workers; a veth delivers every
    /// flow to the queue it was sent on, so here they share one.
    #[arg(long, default_value_t = 1)]
    flows: u16,
    /// Thread the gateway's veth NAPI (XDP and the AF_XDP copy) and pin
    /// it to the forwarder core. By default it runs where the veth
    /// driver puts it, on the sending (generator's) core.
    #[arg(long)]
    napi_on_forwarder: bool,
    /// Build profile whose binaries are measured.
    #[arg(long, default_value = "release")]
    profile: String,
    /// Folder for results (a dated subfolder is made).
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    need_root("subway-bench routed")?;
    let sizes = parse_sizes(&a.sizes, a.quick)?;
    let duration = if a.quick { 1.0 } else { a.duration };
    let trials = if a.quick { 1 } else { a.trials.max(1) };
    let p = Params {
        duration,
        count: a.count,
        rate: a.rate,
        fwd_core: a.fwd_core,
        gen_core: a.gen_core,
        trials,
        tuning: a.tuning,
        napi_on_forwarder: a.napi_on_forwarder,
        search: a.search,
        profile: a.profile,
        flows: a.flows,
    };
    let rows = routed(&sizes, &p)?;
    write_results(&a.out.join(date_stamp()), "routed", &rows, "kernel", a.fwd_core)
}

/// The kernel's forwarding and subway's routed mode at each size, trials
/// interleaved; the median row of each.
pub(super) fn routed(sizes: &[Size], p: &Params) -> Result<Vec<Row>> {
    let subway = profile_bin("subway", &p.profile)?;
    let mut rows = Vec::new();
    for size in sizes {
        let (mut kernel, mut ours) = (Vec::new(), Vec::new());
        for trial in 0..p.trials {
            eprintln!("size {} trial {}/{}", size.label(), trial + 1, p.trials);
            // Kernel forwarding.
            {
                let t = TwoSubnets::new()?;
                let mac = prepare(&t, p.fwd_core)?;
                kernel.push(if p.search {
                    search_loss_free(
                        |rate| measure(&t, &mac, "kernel", size, &Params { rate, ..p.clone() }),
                        7,
                    )?
                } else {
                    measure(&t, &mac, "kernel", size, p)?
                });
            }
            ours.push(routed_subway(size, "subway", p, &subway)?);
        }
        rows.extend(report::median(kernel));
        rows.extend(report::median(ours));
    }
    Ok(rows)
}

/// subway's routed mode (no crypto: the AF_XDP path alone), worker pinned
/// to the forwarder core, with `p.tuning` as extra [Tuning] lines.
pub(super) fn routed_subway(size: &Size, label: &str, p: &Params, subway: &Path) -> Result<Row> {
    let t = TwoSubnets::new()?;
    let mac = prepare(&t, p.fwd_core)?;
    let gw = Subway::start_bin(
        &t.gw,
        &t.routed_config(&format!("Cores = {}\n{}", p.fwd_core, p.tuning.replace(';', "\n"))),
        subway,
    )?;
    std::thread::sleep(Duration::from_millis(300));
    // With XDP attached a veth receives in NAPI, which runs on the sender's
    // core unless threaded: thread it and pin the thread to the forwarder
    // core, so that the generator's core only generates, as with the
    // kernel (RPS).
    if p.napi_on_forwarder {
        t.gw.sh("echo 1 > /sys/class/net/lan0/threaded")?;
        anyhow::ensure!(pin_napi_threads("lan0", p.fwd_core)? > 0, "no NAPI thread for lan0");
    }
    let row = if p.search {
        search_loss_free(|rate| measure(&t, &mac, label, size, &Params { rate, ..p.clone() }), 7)?
    } else {
        measure(&t, &mac, label, size, p)?
    };
    let s = gw.show()?;
    eprintln!(
        "           worker: rx {} in {} batches, {} idle sleeps, {} TX kicks, tx {} tx-ring-full drops {} slow path {}; AF_XDP: {}",
        s["totals"]["rx_packets"],
        s["totals"]["rx_batches"],
        s["totals"]["idle_polls"],
        s["totals"]["tx_wakeups"],
        s["totals"]["tx_packets"],
        s["totals"]["drop_tx_ring_full"],
        s["totals"]["slow_neigh_unknown"],
        s["xsk"]
    );
    let (status, log) = gw.stop();
    if !status.map(|s| s.success()).unwrap_or(false) {
        bail!("subway did not stop cleanly:\n{log}");
    }
    Ok(row)
}

/// Points the gateway's route to SINK_IP at a MAC nobody has and steers the
/// kernel's forwarding to the forwarder core; returns the gateway's LAN MAC.
fn prepare(t: &TwoSubnets, fwd_core: usize) -> Result<String> {
    neigh_to_sink(&t.gw, SINK_IP, "lan1")?;
    // The kernel's forwarding runs where its RX runs: steer it to the
    // forwarder core, as subway's worker is pinned there.
    t.gw.sh(&format!(
        "echo {:x} > /sys/class/net/lan0/queues/rx-0/rps_cpus",
        1u64 << fwd_core
    ))?;

    Ok(t.gw.run(&["cat", "/sys/class/net/lan0/address"])?.trim().to_string())
}

/// Pins the threaded-NAPI kthreads of `ifname` ("napi/IFNAME-N") to `core`.
fn pin_napi_threads(ifname: &str, core: usize) -> Result<usize> {
    let mut n = 0;
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim().starts_with(&format!("napi/{ifname}-")) {
            // SAFETY: a zeroed cpu_set_t with one bit set, for a kernel thread.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(core, &mut set);
                libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set);
            }
            n += 1;
        }
    }
    Ok(n)
}

/// Plain UDP from host a through the gateway, counted on host b's wire.
fn measure(t: &TwoSubnets, gw_mac: &str, contender: &str, size: &Size, p: &Params) -> Result<Row> {
    let g = Gen::plain(&t.a, gw_mac);
    offer(&g, (&t.b, "eth0"), contender, size, p)
}
