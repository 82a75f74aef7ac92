//! `tcp`: one TCP stream (iperf3) host to host through two gateways of each
//! kind (subway, boringtun-cli, wireguard-go), the receiver's Gbit/s; the
//! contenders side by side, the median of trials.

use super::rig::two_gateways;
use super::{Common, Params, date_stamp, need_root};
use anyhow::{Context, Result, bail};
use std::time::Duration;
use subway_testkit::TwoSites;

#[derive(clap::Args, Debug)]
pub struct Args {
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
    #[command(flatten)]
    common: Common,
}

pub fn run(a: Args) -> Result<()> {
    need_root("subway-bench tcp")?;
    let (seconds, trials) = if a.quick {
        (1, 1)
    } else {
        (a.seconds.max(1), a.trials.max(1))
    };
    let mut md = String::from("| contender | Gbit/s (median) | trials |\n|---|---:|---|\n");
    let mut csv = String::from("contender,gbps_median,trials\n");
    let mut any_zero = false;
    for c in a.contenders.split(',').map(str::trim) {
        let mut runs = Vec::new();
        for trial in 0..trials {
            eprintln!("tcp {c} trial {}/{trials}", trial + 1);
            let gbps = tcp_stream(c, seconds, &a.common.profile)?;
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
    let dir = a.common.out.join(date_stamp());
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("tcp.md"), &md)?;
    std::fs::write(dir.join("tcp.csv"), &csv)?;
    eprintln!("results written to {}", dir.display());
    if any_zero {
        bail!("a contender moved no data");
    }
    Ok(())
}

/// One iperf3 TCP stream from a to b through two gateways of kind `c`;
/// returns the receiver's Gbit/s.
pub(super) fn tcp_stream(c: &str, seconds: u32, profile: &str) -> Result<f64> {
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
