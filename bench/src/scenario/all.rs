//! `all`: the whole comparison in one run, one dated folder: the
//! crypto-only ceiling of a core, routed mode vs kernel forwarding (the
//! AF_XDP ceiling), the tunnel in both directions against boringtun-cli and
//! wireguard-go (the baseline of its tables), one TCP stream through two
//! gateways of each kind, latency at a fixed load, the tuning sweep;
//! tables, CSV, plots and a summary.md that sets subway against the better
//! of the two others, its own routed mode and the crypto-only core. About
//! 7 minutes on a 2-core VM; --quick (a smoke test that asserts only
//! that every contender moved packets, that two queues' workers both
//! carried one peer, and that 200 generated peers all got sessions): about 1.

use super::crypto::{crypto, crypto_md};
use super::latency::{check_latency, latency, latency_csv, latency_md};
use super::routed::routed;
use super::tcp::tcp_stream;
use super::tune::tune;
use super::tunnel::tunnel;
use super::{Common, Params, date_stamp, need_root, write_results};
use crate::frames::Size;
use crate::latency::FlowStats;
use crate::report::Row;
use anyhow::{Result, bail};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Smoke test: 64 bytes only, 1-second probes, one trial; asserts
    /// only that every contender moved packets.
    #[arg(long)]
    quick: bool,
    #[command(flatten)]
    common: Common,
}

pub fn run(a: Args) -> Result<()> {
    need_root("subway-bench all")?;
    all(a.quick, &a.common.profile, &a.common.out)
}

/// The whole comparison: see the module's header.
fn all(quick: bool, profile: &str, out: &Path) -> Result<()> {
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

    step("one peer through 1 and 2 queues and workers");
    super::queues::queues(
        &sizes[..1],
        &Params {
            duration: if quick { 1.0 } else { 3.0 },
            ..base.clone()
        },
        1,
        &dir,
    )?;

    step("many peers: sessions, memory, reload, rekey storm");
    let counts: &[usize] = if quick { &super::scale::QUICK } else { &[0, 1000] };
    super::scale::scale(counts, 10, profile, &dir)?;

    step("plots and summary");
    let mut plots = Vec::new();
    for r in [
        crate::plot::throughput(&dir, &enc, &dec),
        crate::plot::latency(&dir, &lat, lat_rate),
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
    lat: &[(String, String, FlowStats)],
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
