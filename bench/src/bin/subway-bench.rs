//! subway-bench: runs contenders side by side on the same namespace
//! topology, the same cores and the same generator, and prints one table.
//!
//! `routed`: subway's routed mode (AF_XDP, no crypto) against the kernel's
//! own IPv4 forwarding, UDP at each packet size, generator on one core,
//! the forwarder on the other.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;
use subway_bench::cpu::CpuTimes;
use subway_bench::frames::Size;
use subway_bench::report::{self, Row};
use subway_tests::{Subway, TwoSites, TwoSubnets, profile_bin, require_root};

#[derive(Parser, Debug)]
#[command(about = "subway's benchmark harness (needs root; builds its own namespaces and removes them)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// subway routed mode vs kernel forwarding, packets/s at each size.
    Routed {
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
    },
    /// One TCP stream (iperf3) host to host through two gateways of each
    /// kind: subway, boringtun-cli, wireguard-go.
    Tcp {
        #[arg(long, default_value = "subway,boringtun-cli,wireguard-go")]
        contenders: String,
        /// Seconds per stream.
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        #[arg(long, default_value_t = 3)]
        trials: usize,
        /// Smoke test: 1 second, 1 trial.
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value = "release")]
        profile: String,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// A WireGuard gateway, subway against wireguard-go and boringtun-cli
    /// (kernel forwarding + TUN), packets/s at each size. Encrypt: LAN
    /// frames in, ciphertext counted on the far wire (the far gateway's
    /// kernel drops it unread). Decrypt: the generator is the gateway's
    /// peer, replaying packets it sealed before the clock started, with
    /// fresh counters; plaintext counted on the LAN wire.
    Tunnel {
        /// encrypt, decrypt, or both (comma-separated).
        #[arg(long, default_value = "encrypt,decrypt")]
        direction: String,
        /// Sizes (wire bytes of the inner frame) or imix, comma-separated.
        #[arg(long, default_value = "64,512,1420")]
        sizes: String,
        /// Contenders, comma-separated.
        #[arg(long, default_value = "subway,boringtun-cli,wireguard-go")]
        contenders: String,
        #[arg(long, default_value_t = 5.0)]
        duration: f64,
        #[arg(long, default_value_t = 1)]
        trials: usize,
        #[arg(long, default_value_t = 0)]
        fwd_core: usize,
        #[arg(long, default_value_t = 1)]
        gen_core: usize,
        /// Smoke test: 64 bytes only, 1 second.
        #[arg(long)]
        quick: bool,
        /// Search for the highest offered rate with loss under 0.1% (an
        /// RFC 2544-style binary search, 7 probes) instead of saturating.
        #[arg(long)]
        search: bool,
        #[arg(long, default_value = "release")]
        profile: String,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Tcp {
            contenders,
            seconds,
            trials,
            quick,
            profile,
            out,
        } => {
            if !require_root("subway-bench tcp") {
                bail!("run as root");
            }
            let (seconds, trials) = if quick { (1, 1) } else { (seconds.max(1), trials.max(1)) };
            let mut md = String::from("| contender | Gbit/s (median) | trials |\n|---|---:|---|\n");
            let mut csv = String::from("contender,gbps_median,trials\n");
            let mut any_zero = false;
            for c in contenders.split(',').map(str::trim) {
                let mut runs = Vec::new();
                for trial in 0..trials {
                    eprintln!("tcp {c} trial {}/{trials}", trial + 1);
                    let gbps = tcp_stream(c, seconds, &profile)?;
                    eprintln!("  {c:>14}: {gbps:.2} Gbit/s");
                    runs.push(gbps);
                }
                runs.sort_by(|a, b| a.total_cmp(b));
                let median = runs[runs.len() / 2];
                any_zero |= median <= 0.0;
                let list = runs.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(" ");
                md += &format!("| {c} | {median:.2} | {list} |\n");
                csv += &format!("{c},{median:.3},{}\n", list.replace(' ', ";"));
            }
            println!("\n{md}");
            let dir = out.join(date_stamp());
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("tcp.md"), &md)?;
            std::fs::write(dir.join("tcp.csv"), &csv)?;
            eprintln!("results written to {}", dir.display());
            if any_zero {
                bail!("a contender moved no data");
            }
            Ok(())
        }
        Cmd::Tunnel {
            direction,
            sizes,
            contenders,
            duration,
            trials,
            fwd_core,
            gen_core,
            quick,
            search,
            profile,
            out,
        } => {
            if !require_root("subway-bench tunnel") {
                bail!("run as root");
            }
            let sizes = parse_sizes(&sizes, quick)?;
            let p = Params {
                duration: if quick { 1.0 } else { duration },
                count: 50_000_000,
                rate: 0,
                fwd_core,
                gen_core,
                trials: if quick { 1 } else { trials.max(1) },
                tuning: String::new(),
                napi_on_forwarder: false,
                search,
                profile,
            };
            let contenders: Vec<&str> = contenders.split(',').map(str::trim).collect();
            let baseline = contenders.last().copied().unwrap_or("wireguard-go");
            let dir = out.join(date_stamp());
            for d in direction.split(',').map(str::trim) {
                let decrypt = match d {
                    "encrypt" => false,
                    "decrypt" => true,
                    other => bail!("--direction {other}: encrypt or decrypt"),
                };
                let rows = tunnel(&sizes, &contenders, decrypt, &p)?;
                write_results(&dir, &format!("tunnel-{d}"), &rows, baseline, fwd_core)?;
            }
            Ok(())
        }
        Cmd::Routed {
            sizes,
            duration,
            count,
            rate,
            fwd_core,
            gen_core,
            trials,
            quick,
            tuning,
            napi_on_forwarder,
            profile,
            out,
        } => {
            if !require_root("subway-bench routed") {
                bail!("run as root");
            }
            let sizes = parse_sizes(&sizes, quick)?;
            let duration = if quick { 1.0 } else { duration };
            let trials = if quick { 1 } else { trials.max(1) };
            let p = Params {
                duration,
                count,
                rate,
                fwd_core,
                gen_core,
                trials,
                tuning,
                napi_on_forwarder,
                search: false,
                profile,
            };
            let rows = routed(&sizes, &p)?;
            write_results(&out.join(date_stamp()), "routed", &rows, "kernel", fwd_core)
        }
    }
}

fn parse_sizes(sizes: &str, quick: bool) -> Result<Vec<Size>> {
    if quick {
        return Ok(vec![Size::Fixed(64)]);
    }
    sizes
        .split(',')
        .map(|s| Size::parse(s.trim()))
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)
}

/// Prints the table and writes NAME.md and NAME.csv under a dated folder;
/// an error if any contender delivered nothing.
/// Writes NAME.md and NAME.csv into `dir` (a dated results folder).
fn write_results(dir: &std::path::Path, name: &str, rows: &[Row], baseline: &str, fwd_core: usize) -> Result<()> {
    let md = report::markdown(rows, baseline, fwd_core);
    println!("\n{md}");
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(format!("{name}.md")), &md)?;
    std::fs::write(dir.join(format!("{name}.csv")), report::csv(rows))?;
    eprintln!("results written to {}", dir.display());
    if rows.iter().any(|r| r.delivered == 0) {
        bail!("a contender delivered no packets");
    }
    Ok(())
}

#[derive(Clone)]
struct Params {
    duration: f64,
    count: u64,
    rate: u64,
    fwd_core: usize,
    gen_core: usize,
    trials: usize,
    tuning: String,
    napi_on_forwarder: bool,
    /// Binary-search the loss-free rate instead of saturating.
    search: bool,
    profile: String,
}

/// The highest offered rate with loss under 0.1%: one unlimited probe
/// gives the ceiling, then `probes` halvings of the interval. Returns the
/// best loss-free row (or the lowest probe's, if none was loss-free).
fn search_loss_free(mut probe: impl FnMut(u64) -> Result<Row>, probes: usize) -> Result<Row> {
    let top = probe(0)?;
    if top.loss_pct() < 0.1 {
        return Ok(top);
    }
    let (mut lo, mut hi) = (0u64, (top.sent as f64 / top.seconds) as u64);
    let mut best: Option<Row> = None;
    let mut last = top;
    for _ in 0..probes {
        let mid = (lo + hi) / 2;
        if mid == 0 {
            break;
        }
        let r = probe(mid)?;
        eprintln!(
            "    search: offered {:.3} Mpps -> loss {:.2}%",
            mid as f64 / 1e6,
            r.loss_pct()
        );
        if r.loss_pct() < 0.1 {
            lo = mid;
            best = Some(r.clone());
        } else {
            hi = mid;
        }
        last = r;
    }
    Ok(best.unwrap_or(last))
}

fn date_stamp() -> String {
    let out = std::process::Command::new("date").arg("+%Y-%m-%d_%H%M%S").output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "run".into())
}

/// Destination used by the generator. The gateway resolves it to a MAC
/// that is not b's: b's veth counts every frame (rx_packets, our sink
/// counter) and its kernel drops it at once as "other host", so the sink
/// costs next to nothing on the forwarder's core.
const SINK_IP: &str = "10.2.0.99";
const SINK_MAC: &str = "02:00:00:00:00:99";

fn prepare(t: &TwoSubnets, fwd_core: usize) -> Result<String> {
    t.gw.run(&[
        "ip",
        "neigh",
        "replace",
        SINK_IP,
        "lladdr",
        SINK_MAC,
        "dev",
        "lan1",
        "nud",
        "permanent",
    ])?;
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

fn measure(t: &TwoSubnets, gw_mac: &str, contender: &str, size: &Size, p: &Params) -> Result<Row> {
    let g = Gen::plain(&t.a, gw_mac);
    offer(&g, (&t.b, "eth0"), contender, size, p)
}

/// Where the generator runs and what it sends.
struct Gen<'a> {
    ns: &'a subway_tests::Netns,
    iface: &'a str,
    dst_mac: String,
    src_ip: &'a str,
    dst_ip: &'a str,
    /// Extra pktgen arguments (the decrypt direction's WireGuard peer).
    extra: Vec<String>,
}

impl<'a> Gen<'a> {
    /// Plain UDP from a LAN host (its eth0, from 10.1.0.2 to SINK_IP).
    fn plain(ns: &'a subway_tests::Netns, gw_mac: &str) -> Gen<'a> {
        Gen {
            ns,
            iface: "eth0",
            dst_mac: gw_mac.to_string(),
            src_ip: "10.1.0.2",
            dst_ip: SINK_IP,
            extra: Vec::new(),
        }
    }
}

/// Runs the generator and counts what reaches the `sink` interface. CPU
/// time is counted from the moment the generator starts sending.
fn offer(g: &Gen, sink: (&subway_tests::Netns, &str), contender: &str, size: &Size, p: &Params) -> Result<Row> {
    use std::io::{BufRead, Read};
    let pktgen = profile_bin("subway-pktgen", &p.profile)?;
    let before = sink.0.if_stat(sink.1, "rx_packets")?;
    let mut args: Vec<String> = [
        "netns",
        "exec",
        &g.ns.name,
        pktgen.to_str().unwrap(),
        "--iface",
        g.iface,
        "--dst-mac",
        &g.dst_mac,
        "--src-ip",
        g.src_ip,
        "--dst-ip",
        g.dst_ip,
        "--size",
        &size.label(),
        "--duration",
        &p.duration.to_string(),
        "--count",
        &p.count.to_string(),
        "--rate",
        &p.rate.to_string(),
        "--core",
        &p.gen_core.to_string(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(g.extra.iter().cloned());
    let mut child = std::process::Command::new("ip")
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting subway-pktgen")?;
    let mut err = std::io::BufReader::new(child.stderr.take().context("no stderr")?);
    let mut line = String::new();
    let mut log = String::new();
    while err.read_line(&mut line)? > 0 {
        log += &line;
        if line.trim() == "sending" {
            break;
        }
        line.clear();
    }
    let cpu0 = CpuTimes::now();
    let mut out = String::new();
    child.stdout.take().context("no stdout")?.read_to_string(&mut out)?;
    err.read_to_string(&mut log)?;
    let status = child.wait()?;
    let cpu1 = CpuTimes::now();
    if !status.success() {
        bail!("subway-pktgen failed ({status}):\n{log}");
    }
    std::thread::sleep(Duration::from_millis(200));
    let delivered = sink.0.if_stat(sink.1, "rx_packets")? - before;
    let g: Value = serde_json::from_str(out.trim()).with_context(|| format!("pktgen printed {out}"))?;
    let row = Row {
        contender: contender.to_string(),
        size: size.label(),
        sent: g["sent"].as_u64().unwrap_or(0),
        delivered,
        seconds: g["seconds"].as_f64().unwrap_or(p.duration),
        mean_wire_bytes: size.mean_wire_bytes(),
        cpu_busy: cpu1.busy_since(&cpu0),
    };
    eprintln!(
        "  {contender:>8} {:>5}: offered {:.3} Mpps, delivered {:.3} Mpps ({:.1}% loss)",
        row.size,
        row.sent as f64 / row.seconds / 1e6,
        row.mpps(),
        row.loss_pct()
    );
    Ok(row)
}

fn routed(sizes: &[Size], p: &Params) -> Result<Vec<Row>> {
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
                kernel.push(measure(&t, &mac, "kernel", size, p)?);
            }
            // subway routed mode, worker pinned to the forwarder core.
            {
                let t = TwoSubnets::new()?;
                let mac = prepare(&t, p.fwd_core)?;
                let gw = Subway::start_bin(
                    &t.gw,
                    &t.routed_config(&format!("Cores = {}\n{}", p.fwd_core, p.tuning.replace(';', "\n"))),
                    &subway,
                )?;
                std::thread::sleep(Duration::from_millis(300));
                // With XDP attached a veth receives in NAPI, which runs on
                // the sender's core unless threaded: thread it and pin the
                // thread to the forwarder core, so that the generator's core
                // only generates, as with the kernel (RPS) above.
                if p.napi_on_forwarder {
                    t.gw.sh("echo 1 > /sys/class/net/lan0/threaded")?;
                    anyhow::ensure!(pin_napi_threads("lan0", p.fwd_core)? > 0, "no NAPI thread for lan0");
                }
                let row = measure(&t, &mac, "subway", size, p)?;
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
                ours.push(row);
                let (status, log) = gw.stop();
                if !status.map(|s| s.success()).unwrap_or(false) {
                    bail!("subway did not stop cleanly:\n{log}");
                }
            }
        }
        rows.extend(report::median(kernel));
        rows.extend(report::median(ours));
    }
    Ok(rows)
}

/// One gateway contender at site A (the one measured) with the same kind at
/// site B (for the handshake). Returns the guards to keep alive.
enum Gw {
    Subway(Subway),
    Standard(subway_tests::WgPeer),
}

fn start_gw(t: &TwoSites, impl_: &str, for_a: bool, p: &Params) -> Result<Gw> {
    Ok(match impl_ {
        "subway" => {
            // Site A's worker on the forwarder core, site B's on the other.
            let core = if for_a { p.fwd_core } else { p.gen_core };
            let cfg = t.subway_config(for_a, false, "") + &format!("\n[Tuning]\nCores = {core}\n");
            Gw::Subway(Subway::start_bin(
                if for_a { &t.gwa } else { &t.gwb },
                &cfg,
                &profile_bin("subway", &p.profile)?,
            )?)
        }
        other => Gw::Standard(t.standard(other, for_a)?),
    })
}

fn tunnel(sizes: &[Size], contenders: &[&str], decrypt: bool, p: &Params) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for size in sizes {
        for c in contenders {
            let mut trials = Vec::new();
            for trial in 0..p.trials {
                let what = if decrypt { "decrypt" } else { "encrypt" };
                eprintln!("{what} size {} {c} trial {}/{}", size.label(), trial + 1, p.trials);
                let t = TwoSites::new()?;
                let ga = start_gw(&t, c, true, p)?;
                if decrypt {
                    trials.push(decrypt_once(&t, &ga, c, size, p)?);
                    continue;
                }
                let _gb = start_gw(&t, c, false, p)?;
                // Handshake with real traffic, then point site A's next hop for
                // the far gateway at a MAC nobody has: the far gateway's wire
                // counts the ciphertext and its kernel drops it at once, so its
                // decryption costs nothing and only site A is measured.
                subway_tests::ping_until(&t.a, "10.2.0.2", 20)
                    .with_context(|| format!("{c}: the tunnel did not come up"))?;
                t.gwa.run(&[
                    "ip",
                    "neigh",
                    "replace",
                    "192.0.2.2",
                    "lladdr",
                    SINK_MAC,
                    "dev",
                    "wan0",
                    "nud",
                    "permanent",
                ])?;
                // No RPS here: the gateway's ingress (the kernel's receive and
                // TUN write for the standard implementations, XDP and the
                // AF_XDP copy for subway) runs on the sending core in both
                // cases, and core `fwd_core` is left to the gateway process.
                if std::env::var_os("SUBWAY_BENCH_RPS").is_some() {
                    t.gwa.sh(&format!(
                        "echo {:x} > /sys/class/net/lan0/queues/rx-0/rps_cpus",
                        1u64 << p.fwd_core
                    ))?;
                }
                pin_standard(&ga, p.fwd_core);
                std::thread::sleep(Duration::from_millis(400));
                let gw_mac = t.gwa.run(&["cat", "/sys/class/net/lan0/address"])?.trim().to_string();
                let row = if p.search {
                    search_loss_free(
                        |rate| {
                            offer(
                                &Gen::plain(&t.a, &gw_mac),
                                (&t.gwb, "wan0"),
                                c,
                                size,
                                &Params { rate, ..p.clone() },
                            )
                        },
                        7,
                    )?
                } else {
                    offer(&Gen::plain(&t.a, &gw_mac), (&t.gwb, "wan0"), c, size, p)?
                };
                if let Gw::Subway(s) = &ga
                    && let Ok(v) = s.show()
                {
                    eprintln!("                 subway: {} {}", v["totals"]["tunnel_tx"], v["xsk"]);
                }
                trials.push(row);
            }
            rows.extend(report::median(trials));
        }
    }
    Ok(rows)
}

/// Pins every thread of a userspace WireGuard to the forwarder core.
fn pin_standard(gw: &Gw, core: usize) {
    if let Gw::Standard(w) = gw {
        for pid in std::iter::once(w.proc.pid()).chain(child_pids(w.proc.pid())) {
            let _ = std::process::Command::new("taskset")
                .args(["-a", "-p", "-c", &core.to_string(), &pid.to_string()])
                .output();
        }
    }
}

/// Packets a decrypt-direction probe seals in advance at most (one UMEM
/// frame each, 2 KiB: 2 GiB); a probe ends at this count or its duration.
const DECRYPT_MAX_PACKETS: u64 = 1 << 20;

/// One decrypt-direction measurement of gateway A (`ga`, already started):
/// the generator in site B's gateway namespace is A's peer B (B's key and
/// address), handshakes with A, and replays sealed packets to A's uplink;
/// what A delivers on its LAN is counted on host a's wire. A resolves
/// host a to a MAC nobody has, so a's kernel drops the plaintext unread
/// (no replies to encrypt back).
fn decrypt_once(t: &TwoSites, ga: &Gw, c: &str, size: &Size, p: &Params) -> Result<Row> {
    t.gwa.run(&[
        "ip",
        "neigh",
        "replace",
        "10.1.0.2",
        "lladdr",
        SINK_MAC,
        "dev",
        "lan0",
        "nud",
        "permanent",
    ])?;
    pin_standard(ga, p.fwd_core);
    std::thread::sleep(Duration::from_millis(400));
    let wan_mac = t.gwa.run(&["cat", "/sys/class/net/wan0/address"])?.trim().to_string();
    let g = Gen {
        ns: &t.gwb,
        iface: "wan0",
        dst_mac: wan_mac,
        src_ip: "10.2.0.2",
        dst_ip: "10.1.0.2",
        extra: [
            "--wg-key",
            &t.keys_b.0,
            "--wg-peer",
            &t.keys_a.1,
            "--wg-listen",
            "192.0.2.2:51820",
            "--wg-endpoint",
            "192.0.2.1:51820",
        ]
        .map(String::from)
        .to_vec(),
    };
    let count = |rate: u64| -> u64 {
        let by_time = if rate == 0 {
            u64::MAX
        } else {
            (rate as f64 * p.duration) as u64 + 1
        };
        p.count.min(DECRYPT_MAX_PACKETS).min(by_time)
    };
    let row = if p.search {
        search_loss_free(
            |rate| {
                offer(
                    &g,
                    (&t.a, "eth0"),
                    c,
                    size,
                    &Params {
                        rate,
                        count: count(rate),
                        ..p.clone()
                    },
                )
            },
            7,
        )?
    } else {
        offer(
            &g,
            (&t.a, "eth0"),
            c,
            size,
            &Params {
                count: count(p.rate),
                ..p.clone()
            },
        )?
    };
    if let Gw::Subway(s) = ga
        && let Ok(v) = s.show()
    {
        eprintln!(
            "                 subway: tunnel_rx {} drops {}",
            v["totals"]["tunnel_rx"],
            v["totals"]
                .as_object()
                .map(|m| m
                    .iter()
                    .filter(|(k, v)| k.starts_with("drop_") && v.as_u64() > Some(0))
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" "))
                .unwrap_or_default()
        );
    }
    Ok(row)
}

/// Direct children of `pid` (the program behind `ip netns exec`).
fn child_pids(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect()
}

/// One iperf3 TCP stream from a to b through two gateways of kind `c`;
/// returns the receiver's Gbit/s.
fn tcp_stream(c: &str, seconds: u32, profile: &str) -> Result<f64> {
    let t = TwoSites::new()?;
    let p = Params {
        duration: 1.0,
        count: 0,
        rate: 0,
        fwd_core: 0,
        gen_core: 1,
        trials: 1,
        tuning: String::new(),
        napi_on_forwarder: false,
        search: false,
        profile: profile.to_string(),
    };
    let _ga = start_gw(&t, c, true, &p)?;
    let _gb = start_gw(&t, c, false, &p)?;
    subway_tests::ping_until(&t.a, "10.2.0.2", 20).with_context(|| format!("{c}: the tunnel did not come up"))?;
    let log = subway_tests::work_dir().join(format!("{}-iperf3.log", subway_tests::unique("ip")));
    let _server = t.b.spawn(&["iperf3", "-s", "-1", "-B", "10.2.0.2"], &log)?;
    std::thread::sleep(Duration::from_millis(300));
    let out =
        t.a.run(&["iperf3", "-c", "10.2.0.2", "-t", &seconds.to_string(), "-J"])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    Ok(v["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A forwarder that carries at most `cap` packets/s.
    fn fake(cap: f64, rate: u64) -> Row {
        let offered = if rate == 0 { 2.0 * cap } else { rate as f64 };
        Row {
            contender: "fake".into(),
            size: "64".into(),
            sent: offered as u64,
            delivered: offered.min(cap) as u64,
            seconds: 1.0,
            mean_wire_bytes: 64.0,
            cpu_busy: vec![],
        }
    }

    #[test]
    fn search_converges_below_the_capacity() {
        let r = search_loss_free(|rate| Ok(fake(500_000.0, rate)), 7).unwrap();
        assert!(r.loss_pct() < 0.1);
        let rate = r.sent as f64;
        assert!(rate <= 500_000.0 && rate > 490_000.0 * 0.98, "found {rate}");
        // A forwarder that keeps up with everything is measured once.
        let r = search_loss_free(|rate| Ok(fake(f64::MAX / 4.0, rate)), 7).unwrap();
        assert_eq!(r.loss_pct(), 0.0);
    }
}
