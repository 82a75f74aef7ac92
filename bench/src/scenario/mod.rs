//! subway-bench's scenarios: each runs contenders side by side on the same
//! namespace topology, the same cores and the same generator, and prints
//! one table. One module a subcommand (its flags, `Args`, and `run`); what
//! several share is here (the shared flags, the run's parameters, size
//! lists, result files, the loss-free search) and in `rig` (the
//! generator, the sink, the gateways).

pub mod all;
pub mod crypto;
pub mod latency;
pub mod queues;
mod rig;
pub mod routed;
pub mod scale;
pub mod scale_out;
pub mod tcp;
pub mod tune;
pub mod tunnel;

use crate::frames::Size;
use crate::report::{self, Row};
use anyhow::{Result, bail};
use std::path::{Path, PathBuf};
use subway_testkit::require_root;

/// `--profile` and `--out`, the flags of every scenario but `routed`
/// (which documents its own) and `crypto` (which runs no binaries and
/// writes no files), flattened into each one's `Args` after its own flags.
#[derive(clap::Args, Debug)]
struct Common {
    #[arg(long, default_value = "release")]
    profile: String,
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

/// An error unless running as root (`require_root` says why).
fn need_root(what: &str) -> Result<()> {
    if !require_root(what) {
        bail!("run as root");
    }
    Ok(())
}

/// The sizes of `--sizes` (64 bytes alone with `--quick`).
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

/// Prints the table and writes NAME.md and NAME.csv into `dir` (a dated
/// results folder); an error if any contender delivered nothing.
fn write_results(dir: &Path, name: &str, rows: &[Row], baseline: &str, fwd_core: usize) -> Result<()> {
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

/// How one measurement runs: the generator's offer, the cores, the
/// gateway's extra tuning and the build profile of the binaries.
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

/// The name of a run's results folder: the local time, to the second.
fn date_stamp() -> String {
    let out = std::process::Command::new("date").arg("+%Y-%m-%d_%H%M%S").output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "run".into())
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
