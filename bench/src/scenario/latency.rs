//! `latency`: one-way latency percentiles, loss and reordering through two
//! gateways of each kind (subway, boringtun-cli, wireguard-go) at a fixed,
//! light offered load; the contenders side by side, no single baseline.
//! The numbers come from subway-sink's records, analysed by
//! `crate::latency` (this module is the scenario that produces them).

use super::rig::{Gen, Reap, pktgen_args, two_gateways};
use super::{Common, Params, date_stamp, need_root, parse_sizes};
use crate::frames::Size;
use crate::latency::FlowStats;
use anyhow::{Context, Result, bail};
use serde_json::Value;
use subway_testkit::{TwoSites, profile_bin};

#[derive(clap::Args, Debug)]
pub struct Args {
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
    #[command(flatten)]
    common: Common,
}

pub fn run(a: Args) -> Result<()> {
    need_root("subway-bench latency")?;
    let sizes = parse_sizes(&a.sizes, a.quick)?;
    let contenders: Vec<&str> = a.contenders.split(',').map(str::trim).collect();
    let dur = if a.quick { 1.0 } else { a.duration };
    let stats = latency(&contenders, &sizes, a.rate, dur, &a.tuning, &a.common.profile)?;
    let dir = a.common.out.join(date_stamp());
    std::fs::create_dir_all(&dir)?;
    let md = latency_md(&stats, a.rate);
    println!("\n{md}");
    std::fs::write(dir.join("latency.md"), &md)?;
    if let Some(png) = crate::plot::latency(&dir, &stats, a.rate)? {
        eprintln!("plot: {}", png.display());
    }
    eprintln!("results written to {}", dir.display());
    check_latency(&stats)
}

/// Latency through two gateways of each kind: a paced flow from host a to
/// a socket on host b, timestamped by b's kernel.
pub(super) fn latency(
    contenders: &[&str],
    sizes: &[Size],
    rate: u64,
    duration: f64,
    tuning: &str,
    profile: &str,
) -> Result<Vec<(String, String, FlowStats)>> {
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

fn latency_once(c: &str, size: &Size, rate: u64, duration: f64, tuning: &str, profile: &str) -> Result<FlowStats> {
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
    let mut sink = Reap(sink);
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
    Ok(crate::latency::analyze(&data, sent, t0, rate))
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

pub(super) fn latency_md(stats: &[(String, String, FlowStats)], rate: u64) -> String {
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

pub(super) fn latency_csv(stats: &[(String, String, FlowStats)], rate: u64) -> String {
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
pub(super) fn check_latency(stats: &[(String, String, FlowStats)]) -> Result<()> {
    if let Some((c, size, _)) = stats.iter().find(|(_, _, s)| s.received == 0) {
        bail!("{c} delivered nothing of the {size}-byte latency flow");
    }
    Ok(())
}
