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
use subway_testkit::{Subway, TwoSites, TwoSubnets, profile_bin, require_root};

#[derive(Parser, Debug)]
#[command(about = "subway's benchmark harness (needs root; builds its own namespaces and removes them)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The whole comparison in one run, one dated folder: the crypto-only
    /// ceiling of a core, routed mode vs kernel forwarding (the AF_XDP
    /// ceiling), the tunnel in both directions against boringtun-cli and
    /// wireguard-go, one TCP stream through two gateways of each kind,
    /// latency at a fixed load, the tuning sweep; tables, CSV, plots and
    /// a summary.md. About 12 minutes on a 2-core VM; --quick: under 2.
    All {
        /// Smoke test: 64 bytes only, 1-second probes, one trial; asserts
        /// only that every contender moved packets.
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value = "release")]
        profile: String,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// One-way latency percentiles, loss and reordering through two
    /// gateways of each kind, at a fixed offered load.
    Latency {
        #[arg(long, default_value = "subway,boringtun-cli,wireguard-go")]
        contenders: String,
        #[arg(long, default_value = "64,1420")]
        sizes: String,
        /// Offered load, packets/s (light: the generator sleeps between
        /// packets, and the gateways' idle behaviour is part of what is
        /// measured).
        #[arg(long, default_value_t = 5_000)]
        rate: u64,
        #[arg(long, default_value_t = 4.0)]
        duration: f64,
        /// Extra [Tuning] lines for subway, e.g. "IdleSpin = 0".
        #[arg(long, default_value = "")]
        tuning: String,
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value = "release")]
        profile: String,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// The crypto-only ceiling: data messages sealed and opened per second
    /// by one core.
    Crypto {
        #[arg(long, default_value_t = 1.0)]
        secs: f64,
        #[arg(long, default_value_t = 0)]
        core: usize,
    },
    /// Which [Tuning] settings win on this box: batch size, ring size,
    /// need_wakeup vs busy poll vs spinning, idle spin, the worker's core,
    /// XDP driver vs generic mode, copy vs zero-copy; routed mode at 64
    /// bytes (the AF_XDP path without crypto, where the knobs matter).
    Tune {
        #[arg(long)]
        quick: bool,
        #[arg(long, default_value = "release")]
        profile: String,
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
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
        Cmd::All { quick, profile, out } => {
            if !require_root("subway-bench all") {
                bail!("run as root");
            }
            all(quick, &profile, &out)
        }
        Cmd::Latency {
            contenders,
            sizes,
            rate,
            duration,
            tuning,
            quick,
            profile,
            out,
        } => {
            if !require_root("subway-bench latency") {
                bail!("run as root");
            }
            let sizes = parse_sizes(&sizes, quick)?;
            let contenders: Vec<&str> = contenders.split(',').map(str::trim).collect();
            let dur = if quick { 1.0 } else { duration };
            let stats = latency(&contenders, &sizes, rate, dur, &tuning, &profile)?;
            let dir = out.join(date_stamp());
            std::fs::create_dir_all(&dir)?;
            let md = latency_md(&stats, rate);
            println!("\n{md}");
            std::fs::write(dir.join("latency.md"), &md)?;
            if let Some(png) = subway_bench::plot::latency(&dir, &stats, rate)? {
                eprintln!("plot: {}", png.display());
            }
            eprintln!("results written to {}", dir.display());
            check_latency(&stats)
        }
        Cmd::Crypto { secs, core } => {
            let md = crypto_md(&crypto(&[64, 512, 1420], secs, core));
            println!("{md}");
            Ok(())
        }
        Cmd::Tune { quick, profile, out } => {
            if !require_root("subway-bench tune") {
                bail!("run as root");
            }
            let dir = out.join(date_stamp());
            std::fs::create_dir_all(&dir)?;
            let md = tune(quick, &profile)?;
            println!("\n{md}");
            std::fs::write(dir.join("tune.md"), &md)?;
            eprintln!("results written to {}", dir.display());
            Ok(())
        }
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
                flows: 1,
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
            search,
            flows,
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
                search,
                profile,
                flows,
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
    /// Distinct UDP source ports the generator cycles through.
    flows: u16,
}

impl Params {
    /// One trial, saturating, forwarder on core 0 and generator on core 1,
    /// no extra tuning, one flow.
    fn base(duration: f64, profile: &str) -> Params {
        Params {
            duration,
            count: 50_000_000,
            rate: 0,
            fwd_core: 0,
            gen_core: 1,
            trials: 1,
            tuning: String::new(),
            napi_on_forwarder: false,
            flows: 1,
            search: false,
            profile: profile.to_string(),
        }
    }
}

/// Gateways of kind `c` at both sites, each on one core (as subway's
/// workers are pinned), with the tunnel up.
fn two_gateways(t: &TwoSites, c: &str, p: &Params) -> Result<(Gw, Gw)> {
    let ga = start_gw(t, c, true, p)?;
    let gb = start_gw(t, c, false, p)?;
    pin_standard(&ga, p.fwd_core);
    pin_standard(&gb, p.gen_core);
    subway_testkit::ping_until(&t.a, "10.2.0.2", 20).with_context(|| format!("{c}: the tunnel did not come up"))?;
    Ok((ga, gb))
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
    ns: &'a subway_testkit::Netns,
    iface: &'a str,
    dst_mac: String,
    src_ip: &'a str,
    dst_ip: &'a str,
    /// Extra pktgen arguments (the decrypt direction's WireGuard peer).
    extra: Vec<String>,
}

impl<'a> Gen<'a> {
    /// Plain UDP from a LAN host (its eth0, from 10.1.0.2 to SINK_IP).
    fn plain(ns: &'a subway_testkit::Netns, gw_mac: &str) -> Gen<'a> {
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

/// subway-pktgen's command line for this generator, size and parameters.
fn pktgen_args(g: &Gen, size: &Size, p: &Params) -> Result<Vec<String>> {
    let pktgen = profile_bin("subway-pktgen", &p.profile)?;
    let mut args: Vec<String> = [
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
        "--flows",
        &p.flows.to_string(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(g.extra.iter().cloned());
    Ok(args)
}

/// Runs the generator and counts what reaches the `sink` interface. CPU
/// time is counted from the moment the generator starts sending.
fn offer(g: &Gen, sink: (&subway_testkit::Netns, &str), contender: &str, size: &Size, p: &Params) -> Result<Row> {
    use std::io::{BufRead, Read};
    let before = sink.0.if_stat(sink.1, "rx_packets")?;
    let mut args: Vec<String> = vec!["netns".into(), "exec".into(), g.ns.name.clone()];
    args.extend(pktgen_args(g, size, p)?);
    let child = std::process::Command::new("ip")
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting subway-pktgen")?;
    // Reaped on every path (an early return would leave it running).
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Reap(child);
    let mut err = std::io::BufReader::new(child.0.stderr.take().context("no stderr")?);
    let mut line = String::new();
    let mut log = String::new();
    // CPU time counts from "sending" to "sent": not the sealing before,
    // nor the draining and teardown after.
    let mut window = (None, None);
    while err.read_line(&mut line)? > 0 {
        log += &line;
        match line.trim() {
            "sending" => window.0 = Some(CpuTimes::now()),
            "sent" => {
                window.1 = Some(CpuTimes::now());
                break;
            }
            _ => {}
        }
        line.clear();
    }
    let mut out = String::new();
    child.0.stdout.take().context("no stdout")?.read_to_string(&mut out)?;
    err.read_to_string(&mut log)?;
    let status = child.0.wait()?;
    if !status.success() {
        bail!("subway-pktgen failed ({status}):\n{log}");
    }
    let (Some(cpu0), Some(cpu1)) = window else {
        bail!("subway-pktgen did not report its send window:\n{log}");
    };
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
        cpu_busy_ns: cpu1.busy_ns_since(&cpu0),
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
fn routed_subway(size: &Size, label: &str, p: &Params, subway: &std::path::Path) -> Result<Row> {
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

/// One gateway contender at site A (the one measured) with the same kind at
/// site B (for the handshake). Returns the guards to keep alive.
enum Gw {
    Subway(Subway),
    Standard(subway_testkit::WgPeer),
}

fn start_gw(t: &TwoSites, impl_: &str, for_a: bool, p: &Params) -> Result<Gw> {
    Ok(match impl_ {
        "subway" => {
            // Site A's worker on the forwarder core, site B's on the other.
            let core = if for_a { p.fwd_core } else { p.gen_core };
            let cfg = t.subway_config(for_a, false, "")
                + &format!("\n[Tuning]\nCores = {core}\n{}\n", p.tuning.replace(';', "\n"));
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
        // Trials outside, contenders inside: a slow spell of the shared
        // machine lands on every contender, not on one.
        let mut by_contender: Vec<Vec<Row>> = vec![Vec::new(); contenders.len()];
        for trial in 0..p.trials {
            for (ci, c) in contenders.iter().enumerate() {
                let trials = &mut by_contender[ci];
                let what = if decrypt { "decrypt" } else { "encrypt" };
                eprintln!("{what} size {} {c} trial {}/{}", size.label(), trial + 1, p.trials);
                let t = TwoSites::new()?;
                let ga = start_gw(&t, c, true, p)?;
                if decrypt {
                    trials.push(decrypt_once(&t, &ga, c, size, p)?);
                    continue;
                }
                let gb = start_gw(&t, c, false, p)?;
                // Handshake with real traffic, then point site A's next hop for
                // the far gateway at a MAC nobody has: the far gateway's wire
                // counts the ciphertext and its kernel drops it at once, so its
                // decryption costs nothing and only site A is measured.
                subway_testkit::ping_until(&t.a, "10.2.0.2", 20)
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
                // The far gateway has done its part (the handshake): gone,
                // it costs the measured core nothing (subway's XDP program
                // on its wire would otherwise run for every frame).
                drop(gb);
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
        }
        for trials in by_contender {
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
    let _gateways = two_gateways(&t, c, &Params::base(1.0, profile))?;
    let log = subway_testkit::work_dir().join(format!("{}-iperf3.log", subway_testkit::unique("ip")));
    let _server = t.b.spawn(&["iperf3", "-s", "-1", "-B", "10.2.0.2"], &log)?;
    std::thread::sleep(Duration::from_millis(300));
    let out = t.a.run(&[
        "timeout",
        &(seconds + 30).to_string(),
        "iperf3",
        "-c",
        "10.2.0.2",
        "-t",
        &seconds.to_string(),
        "-J",
    ])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    Ok(v["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9)
}

/// Latency through two gateways of each kind: a paced flow from host a to
/// a socket on host b, timestamped by b's kernel.
fn latency(
    contenders: &[&str],
    sizes: &[Size],
    rate: u64,
    duration: f64,
    tuning: &str,
    profile: &str,
) -> Result<Vec<(String, String, subway_bench::latency::FlowStats)>> {
    let mut out = Vec::new();
    for size in sizes {
        for c in contenders {
            eprintln!("latency {c} size {} at {rate} pps", size.label());
            let s = latency_once(c, size, rate, duration, tuning, profile)?;
            eprintln!(
                "  {c:>14}: received {}/{} lost {} reordered {} p50 {:.0} us p99 {:.0} us p99.9 {:.0} us",
                s.received, s.sent, s.lost, s.reordered, s.p50_us, s.p99_us, s.p999_us
            );
            out.push((c.to_string(), size.label(), s));
        }
    }
    Ok(out)
}

fn latency_once(
    c: &str,
    size: &Size,
    rate: u64,
    duration: f64,
    tuning: &str,
    profile: &str,
) -> Result<subway_bench::latency::FlowStats> {
    use std::io::{BufRead, Read};
    let t = TwoSites::new()?;
    let p = Params {
        count: (rate as f64 * duration) as u64,
        rate,
        tuning: tuning.to_string(),
        ..Params::base(duration, profile)
    };
    let _gateways = two_gateways(&t, c, &p)?;
    let records = subway_testkit::work_dir().join(format!("{}.sink", subway_testkit::unique("lat")));
    let sink_bin = profile_bin("subway-sink", profile)?;
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let sink = std::process::Command::new("ip")
        .args(["netns", "exec", &t.b.name, sink_bin.to_str().unwrap()])
        .args(["--bind", "10.2.0.2:9", "--idle", "1.5", "--duration"])
        .arg(format!("{}", duration + 15.0))
        .arg("--out")
        .arg(&records)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting subway-sink")?;
    // Killed on every error path below; waited for on success.
    let mut sink = KillOnDrop(sink);
    let mut err = std::io::BufReader::new(sink.0.stderr.take().context("no stderr")?);
    let mut line = String::new();
    err.read_line(&mut line)?;
    anyhow::ensure!(line.trim() == "ready", "subway-sink: {line}");
    let gw_mac = t.gwa.run(&["cat", "/sys/class/net/lan0/address"])?.trim().to_string();
    let g = Gen {
        ns: &t.a,
        iface: "eth0",
        dst_mac: gw_mac,
        src_ip: "10.1.0.2",
        dst_ip: "10.2.0.2",
        extra: Vec::new(),
    };
    // The sink counts at b's socket; the row's own counter (b's veth) is
    // not what is reported here.
    let row_json = offer_json(&g, size, &p)?;
    let mut out = String::new();
    sink.0.stdout.take().context("no stdout")?.read_to_string(&mut out)?;
    let status = sink.0.wait()?;
    anyhow::ensure!(status.success(), "subway-sink failed: {out}");
    let data = std::fs::read(&records)?;
    let _ = std::fs::remove_file(&records);
    let sent = row_json["sent"].as_u64().unwrap_or(0);
    let t0 = row_json["t0_unix_ns"].as_u64().unwrap_or(0);
    Ok(subway_bench::latency::analyze(&data, sent, t0, rate))
}

/// Runs the generator and returns its JSON line (for the latency run,
/// where the sink, not a wire counter, is the measure).
fn offer_json(g: &Gen, size: &Size, p: &Params) -> Result<Value> {
    // The count bounds the flow; the duration is only a safety margin.
    let args = pktgen_args(
        g,
        size,
        &Params {
            duration: p.duration + 1.0,
            ..p.clone()
        },
    )?;
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = g.ns.run(&a)?;
    serde_json::from_str(out.trim()).with_context(|| format!("pktgen printed {out}"))
}

fn latency_md(stats: &[(String, String, subway_bench::latency::FlowStats)], rate: u64) -> String {
    let mut md = format!(
        "One-way latency through two gateways of each kind at {rate} packets/s (kernel receive timestamp at the sink minus the paced send time):\n\n\
         | size | contender | received / sent | lost | reordered | duplicates | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for (c, size, s) in stats {
        md += &format!(
            "| {size} | {c} | {} / {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |\n",
            s.received, s.sent, s.lost, s.reordered, s.duplicates, s.p50_us, s.p90_us, s.p99_us, s.p999_us, s.max_us
        );
    }
    md
}

fn latency_csv(stats: &[(String, String, subway_bench::latency::FlowStats)], rate: u64) -> String {
    let mut csv = String::from(
        "size,contender,rate_pps,sent,received,lost,reordered,duplicates,p50_us,p90_us,p99_us,p999_us,max_us\n",
    );
    for (c, size, s) in stats {
        csv += &format!(
            "{size},{c},{rate},{},{},{},{},{},{:.1},{:.1},{:.1},{:.1},{:.1}\n",
            s.sent, s.received, s.lost, s.reordered, s.duplicates, s.p50_us, s.p90_us, s.p99_us, s.p999_us, s.max_us
        );
    }
    csv
}

/// Every contender must have carried the flow (a smoke test asserts
/// movement, never a speed).
fn check_latency(stats: &[(String, String, subway_bench::latency::FlowStats)]) -> Result<()> {
    if let Some((c, size, _)) = stats.iter().find(|(_, _, s)| s.received == 0) {
        bail!("{c} delivered nothing of the {size}-byte latency flow");
    }
    Ok(())
}

/// The crypto ceiling per size: (size label, seal/s, open/s), pinned to `core`.
fn crypto(sizes: &[usize], secs: f64, core: usize) -> Vec<(usize, f64, f64)> {
    std::thread::scope(|s| {
        s.spawn(|| {
            core_affinity::set_for_current(core_affinity::CoreId { id: core });
            sizes
                .iter()
                .map(|&size| {
                    // Wire size of the inner frame -> its IP packet.
                    let (seal, open) = subway_bench::ceiling::crypto_rates(size - 4 - 14, secs);
                    eprintln!(
                        "crypto {size}: seal {:.3} Mpps, open {:.3} Mpps",
                        seal / 1e6,
                        open / 1e6
                    );
                    (size, seal, open)
                })
                .collect()
        })
        .join()
        .unwrap_or_default()
    })
}

fn crypto_md(rows: &[(usize, f64, f64)]) -> String {
    let mut md = String::from(
        "Crypto-only ceiling of one core (subway's session: ChaCha20-Poly1305 from ring, no packet I/O):\n\n\
         | size | seal Mpps | open Mpps | seal Gbit/s | open Gbit/s |\n|---|---:|---:|---:|---:|\n",
    );
    for (size, seal, open) in rows {
        let bits = *size as f64 * 8.0 / 1e9;
        md += &format!(
            "| {size} | {:.3} | {:.3} | {:.2} | {:.2} |\n",
            seal / 1e6,
            open / 1e6,
            seal * bits,
            open * bits
        );
    }
    md
}

/// The tuning sweep: one [Tuning] change at a time against the defaults,
/// routed mode, 64 bytes, saturating; the median of trials.
fn tune(quick: bool, profile: &str) -> Result<String> {
    let subway = profile_bin("subway", profile)?;
    let settings: Vec<(&str, String)> = vec![
        (
            "defaults (BatchSize 64, RingSize 2048, NeedWakeup, IdleSpin 512, XDP auto)",
            String::new(),
        ),
        ("BatchSize = 16", "BatchSize = 16".into()),
        ("BatchSize = 32", "BatchSize = 32".into()),
        ("BatchSize = 128", "BatchSize = 128".into()),
        ("RingSize = 512", "RingSize = 512".into()),
        ("RingSize = 4096", "RingSize = 4096".into()),
        ("NeedWakeup = false (always kick)", "NeedWakeup = false".into()),
        ("BusyPoll = true", "BusyPoll = true".into()),
        ("IdleSpin = 0", "IdleSpin = 0".into()),
        ("IdleSpin = 4096", "IdleSpin = 4096".into()),
        ("XdpMode = generic", "XdpMode = generic".into()),
        ("XdpMode = driver", "XdpMode = driver".into()),
        ("XskMode = zero-copy", "XskMode = zero-copy".into()),
        ("worker on the generator's core", "@same-core".into()),
    ];
    let mut settings = if quick { settings[..2].to_vec() } else { settings };
    // The defaults once more, last in every round: how far apart two runs
    // of the same thing are on this box is the noise every ratio carries.
    if !quick {
        settings.push(("defaults, again (noise check)", String::new()));
    }
    let trials = if quick { 1 } else { 3 };
    let size = Size::Fixed(64);
    // Rounds of every setting in turn (interleaved, so that a slow phase
    // of the machine does not land on one setting), then medians.
    let mut rows: Vec<Vec<Row>> = vec![Vec::new(); settings.len()];
    let mut errors: Vec<Option<String>> = vec![None; settings.len()];
    for round in 0..trials {
        for (i, (label, tuning)) in settings.iter().enumerate() {
            if errors[i].is_some() {
                continue;
            }
            let (fwd_core, tuning) = match tuning.as_str() {
                "@same-core" => (1, String::new()),
                t => (0, t.to_string()),
            };
            let p = Params {
                count: 20_000_000,
                fwd_core,
                trials,
                tuning,
                ..Params::base(if quick { 1.0 } else { 2.0 }, profile)
            };
            eprintln!("tune round {}/{trials}: {label}", round + 1);
            match routed_subway(&size, label, &p, &subway) {
                Ok(r) => rows[i].push(r),
                Err(e) => {
                    // The reason is the log's last "subway:" line, or the first.
                    let text = format!("{e:#}");
                    let why = text
                        .lines()
                        .rev()
                        .find(|l| l.contains("subway:") || l.contains("ERROR"))
                        .or_else(|| text.lines().next())
                        .unwrap_or("failed")
                        .trim()
                        .to_string();
                    errors[i] = Some(why);
                }
            }
        }
    }
    // Only a setting this box cannot offer may fail (zero-copy on a driver
    // without it, refused by subway with its reason): any other failure is
    // a broken run, and the sweep says so instead of making it a row.
    for ((label, _), err) in settings.iter().zip(&errors) {
        if let Some(why) = err
            && !label.starts_with("XskMode = zero-copy")
        {
            bail!("tune: {label} failed: {why}");
        }
    }
    let results: Vec<(&str, Result<Row, String>)> = settings
        .iter()
        .zip(rows)
        .zip(errors)
        .map(|(((label, _), rows), err)| {
            (
                *label,
                report::median(rows).ok_or(err.unwrap_or_else(|| "no result".into())),
            )
        })
        .collect();
    let rate_of = |label: &str| {
        results
            .iter()
            .find(|(l, _)| l.starts_with(label))
            .and_then(|(_, r)| r.as_ref().ok())
            .map(|r| r.mpps())
            .unwrap_or(0.0)
    };
    let base = rate_of("defaults (");
    let again = rate_of("defaults, again");
    let noise = if base > 0.0 && again > 0.0 {
        (again / base - 1.0).abs()
    } else {
        0.0
    };
    let mut md = format!(
        "Tuning sweep: subway routed mode (AF_XDP, no crypto), 64-byte frames, saturating, one change at a time, \
         median of {trials} interleaved rounds (ns/pkt: the worker's core; the generator's core for that row, \
         so it includes the generator):\n\n\
         | setting | delivered Mpps | vs defaults | loss | worker core ns/pkt |\n|---|---:|---:|---:|---:|\n",
    );
    let mut best: Option<(&str, f64)> = None;
    for (label, r) in &results {
        match r {
            Ok(r) => {
                md += &format!(
                    "| {label} | {:.3} | {:.2}x | {:.1}% | {:.0} |\n",
                    r.mpps(),
                    if base > 0.0 { r.mpps() / base } else { 0.0 },
                    r.loss_pct(),
                    r.ns_per_pkt(if label.contains("generator's core") { 1 } else { 0 })
                );
                if !label.starts_with("defaults") && best.is_none_or(|(_, m)| r.mpps() > m) {
                    best = Some((label, r.mpps()));
                }
            }
            Err(e) => md += &format!("| {label} | failed | | | {} |\n", e.replace('|', "/")),
        }
    }
    // A setting wins only if it beats both runs of the defaults by more
    // than the spread between those two runs (and at least 5%).
    let bar = base.max(again) * (1.0 + noise.max(0.05));
    md += &format!(
        "\nThe defaults measured twice differ by {:.0}%: that is this box's noise for one setting.\n",
        noise * 100.0
    );
    match best {
        _ if quick => md += "\nQuick run: one round, no noise check, no winner.\n",
        Some((label, m)) if m > bar => {
            md += &format!(
                "Winner on this box: **{label}** ({m:.3} Mpps, {:.2}x the defaults), beyond the noise.\n",
                if base > 0.0 { m / base } else { 0.0 }
            )
        }
        Some((label, m)) => {
            md += &format!(
                "No setting beats the defaults by more than the noise (best: {label}, {m:.3} Mpps): keep the defaults here.\n"
            )
        }
        None => {}
    }
    Ok(md)
}

/// The whole comparison: see `Cmd::All`.
fn all(quick: bool, profile: &str, out: &std::path::Path) -> Result<()> {
    let started = std::time::Instant::now();
    let dir = out.join(date_stamp());
    std::fs::create_dir_all(&dir)?;
    let step = |name: &str| eprintln!("\n=== {name} ({:.0} s elapsed)", started.elapsed().as_secs_f64());
    let sizes: Vec<Size> = if quick {
        vec![Size::Fixed(64)]
    } else {
        vec![Size::Fixed(64), Size::Fixed(512), Size::Fixed(1420)]
    };
    let contenders = ["subway", "boringtun-cli", "wireguard-go"];
    let base = Params {
        count: if quick { 300_000 } else { 50_000_000 },
        ..Params::base(if quick { 1.0 } else { 4.0 }, profile)
    };

    step("crypto-only ceiling of one core");
    let crypto_sizes: Vec<usize> = sizes
        .iter()
        .map(|s| match s {
            Size::Fixed(n) => *n,
            Size::Imix => 64,
        })
        .collect();
    let ceiling = crypto(&crypto_sizes, if quick { 0.2 } else { 1.0 }, base.fwd_core);
    std::fs::write(dir.join("crypto.md"), crypto_md(&ceiling))?;

    step("routed mode vs kernel forwarding (the AF_XDP ceiling)");
    let routed_rows = routed(
        &sizes,
        &Params {
            trials: if quick { 1 } else { 3 },
            ..base.clone()
        },
    )?;
    write_results(&dir, "routed", &routed_rows, "kernel", base.fwd_core)?;

    step("tunnel, encrypt direction");
    let tunnel_p = Params {
        trials: if quick { 1 } else { 3 },
        duration: if quick { 1.0 } else { 3.0 },
        ..base.clone()
    };
    let enc = tunnel(&sizes, &contenders, false, &tunnel_p)?;
    write_results(&dir, "tunnel-encrypt", &enc, "wireguard-go", base.fwd_core)?;
    step("tunnel, decrypt direction");
    let dec = tunnel(&sizes, &contenders, true, &tunnel_p)?;
    write_results(&dir, "tunnel-decrypt", &dec, "wireguard-go", base.fwd_core)?;

    step("one TCP stream through two gateways of each kind");
    let mut tcp = Vec::new();
    for c in contenders {
        let mut runs = Vec::new();
        for _ in 0..if quick { 1 } else { 3 } {
            runs.push(tcp_stream(c, if quick { 1 } else { 4 }, profile)?);
        }
        runs.sort_by(|a, b| a.total_cmp(b));
        eprintln!("  {c:>14}: {:.2} Gbit/s", runs[runs.len() / 2]);
        tcp.push((c, runs[runs.len() / 2]));
    }

    step("latency at a fixed load");
    let lat_rate = 5_000;
    let lat_sizes: Vec<Size> = if quick {
        vec![Size::Fixed(64)]
    } else {
        vec![Size::Fixed(64), Size::Fixed(1420)]
    };
    let lat = latency(
        &contenders,
        &lat_sizes,
        lat_rate,
        if quick { 1.0 } else { 4.0 },
        "",
        profile,
    )?;
    std::fs::write(dir.join("latency.md"), latency_md(&lat, lat_rate))?;
    std::fs::write(dir.join("latency.csv"), latency_csv(&lat, lat_rate))?;
    let mut tcp_csv = String::from("contender,gbps_median\n");
    for (c, g) in &tcp {
        tcp_csv += &format!("{c},{g:.3}\n");
    }
    std::fs::write(dir.join("tcp.csv"), tcp_csv)?;
    let mut crypto_csv = String::from("size,seal_pps,open_pps\n");
    for (size, seal, open) in &ceiling {
        crypto_csv += &format!("{size},{seal:.0},{open:.0}\n");
    }
    std::fs::write(dir.join("crypto.csv"), crypto_csv)?;

    step("tuning sweep");
    let tune_md = tune(quick, profile)?;
    std::fs::write(dir.join("tune.md"), &tune_md)?;

    step("plots and summary");
    let mut plots = Vec::new();
    for r in [
        subway_bench::plot::throughput(&dir, &enc, &dec),
        subway_bench::plot::latency(&dir, &lat, lat_rate),
    ] {
        match r {
            Ok(Some(p)) => plots.push(p),
            Ok(None) => eprintln!("gnuplot is not installed: no plots (./setup.sh installs it)"),
            Err(e) => eprintln!("plot: {e}"),
        }
    }
    let summary = summary_md(
        &enc,
        &dec,
        &routed_rows,
        &ceiling,
        &tcp,
        &lat,
        lat_rate,
        &plots,
        quick,
        started.elapsed(),
    );
    std::fs::write(dir.join("summary.md"), &summary)?;
    println!("\n{summary}\n{}\n{tune_md}", crypto_md(&ceiling));
    eprintln!(
        "results written to {} in {:.0} s",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    // A smoke test asserts movement only.
    for r in enc.iter().chain(&dec).chain(&routed_rows) {
        if r.delivered == 0 {
            bail!("{} delivered no packets at {} bytes", r.contender, r.size);
        }
    }
    if let Some((c, _)) = tcp.iter().find(|(_, g)| *g <= 0.0) {
        bail!("{c} carried no TCP data");
    }
    check_latency(&lat)
}

#[allow(clippy::too_many_arguments)]
fn summary_md(
    enc: &[Row],
    dec: &[Row],
    routed_rows: &[Row],
    ceiling: &[(usize, f64, f64)],
    tcp: &[(&str, f64)],
    lat: &[(String, String, subway_bench::latency::FlowStats)],
    lat_rate: u64,
    plots: &[PathBuf],
    quick: bool,
    took: Duration,
) -> String {
    let ncpu = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mut md = format!(
        "# subway-bench all{}\n\nOne run, same topology, cores and generator for every contender ({ncpu} cores, veth pairs, \
         so copy-mode AF_XDP; generator on core 1, the gateway under test on core 0). Took {:.0} s. \
         A ratio marked ≥ is a floor: subway lost under 0.5% there, so it carried all the generator offered.\n\n",
        if quick {
            " --quick (smoke test: not a measurement)"
        } else {
            ""
        },
        took.as_secs_f64()
    );
    let find = |rows: &[Row], c: &str, size: &str| rows.iter().find(|r| r.contender == c && r.size == size).cloned();
    for (name, rows, crypto_col) in [
        ("Encrypt (LAN to tunnel)", enc, 1usize),
        ("Decrypt (tunnel to LAN)", dec, 2),
    ] {
        md += &format!(
            "## {name}\n\n| size | subway Mpps | Gbit/s | boringtun-cli Mpps | wireguard-go Mpps | subway vs the better | vs own routed (no crypto) | vs crypto-only core |\n|---|---:|---:|---:|---:|---:|---:|---:|\n"
        );
        let mut sizes: Vec<String> = Vec::new();
        for r in rows {
            if !sizes.contains(&r.size) {
                sizes.push(r.size.clone());
            }
        }
        for size in sizes {
            let Some(s) = find(rows, "subway", &size) else { continue };
            let bt = find(rows, "boringtun-cli", &size).map(|r| r.mpps()).unwrap_or(0.0);
            let wg = find(rows, "wireguard-go", &size).map(|r| r.mpps()).unwrap_or(0.0);
            let better = bt.max(wg);
            let routed = find(routed_rows, "subway", &size).map(|r| r.mpps()).unwrap_or(0.0);
            let ceil = ceiling
                .iter()
                .find(|c| c.0.to_string() == size)
                .map(|c| if crypto_col == 1 { c.1 } else { c.2 } / 1e6)
                .unwrap_or(0.0);
            let ratio = |a: f64, b: f64| if b > 0.0 { format!("{:.2}x", a / b) } else { "-".into() };
            let floor = if s.loss_pct() < 0.5 { "≥" } else { "" };
            md += &format!(
                "| {size} | {:.3} | {:.2} | {bt:.3} | {wg:.3} | {floor}{} | {} | {} |\n",
                s.mpps(),
                s.gbps(),
                ratio(s.mpps(), better),
                ratio(s.mpps(), routed),
                ratio(s.mpps(), ceil)
            );
        }
        md.push('\n');
    }
    md += "## One TCP stream host to host through two gateways (iperf3)\n\n| contender | Gbit/s |\n|---|---:|\n";
    for (c, g) in tcp {
        md += &format!("| {c} | {g:.2} |\n");
    }
    md.push('\n');
    md += &format!("## Latency\n\n{}\n", latency_md(lat, lat_rate));
    if !plots.is_empty() {
        md += "## Plots\n\n";
        for p in plots {
            if let Some(f) = p.file_name() {
                md += &format!("![{}]({})\n", f.to_string_lossy(), f.to_string_lossy());
            }
        }
    }
    md
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
            cpu_busy_ns: vec![],
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
