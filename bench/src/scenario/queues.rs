//! `queues`: one peer through 1 and then 2 RX queues and workers, encrypt
//! direction: LAN frames in on one or two queues (a generator per queue,
//! as a NIC's RSS spreads a LAN's flows), ciphertext for the one peer
//! counted on the far wire. Reports the delivered rate and what matters on
//! a box this small: the workers' own CPU time per packet (their threads'
//! utime + stime over the offer, from /proc), which should stay flat as
//! workers are added if nothing is shared between them but the session's
//! counter (reserved per batch).
//!
//! On this 2-core VM the two generators and the two workers share the two
//! cores, so the rate cannot double here; ns per packet per worker says
//! what a box with a core per worker would do.

use super::rig::{Gen, offer, start_gw};
use super::tunnel::encrypt_rig;
use super::{Common, Params, date_stamp, need_root, parse_sizes};
use crate::frames::Size;
use anyhow::{Context, Result};
use subway_testkit::TwoSites;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Sizes (wire bytes of the inner frame), comma-separated.
    #[arg(long, default_value = "64,1420")]
    sizes: String,
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    #[arg(long, default_value_t = 1)]
    trials: usize,
    /// Smoke test: 64 bytes only, 1 second.
    #[arg(long)]
    quick: bool,
    #[command(flatten)]
    common: Common,
}

pub fn run(a: Args) -> Result<()> {
    need_root("subway-bench queues")?;
    let sizes = parse_sizes(&a.sizes, a.quick)?;
    let p = Params::base(if a.quick { 1.0 } else { a.duration }, &a.common.profile);
    queues(&sizes, &p, a.trials, &a.common.out.join(date_stamp()))
}

/// The table for `sizes`, 1 then 2 queues, `trials` times; printed and
/// written to queues.md in `dir`. An error if nothing was delivered or a
/// worker of two sealed nothing (one peer did not spread).
pub(super) fn queues(sizes: &[Size], p: &Params, trials: usize, dir: &std::path::Path) -> Result<()> {
    let mut md = String::from(
        "| size | queues / workers | delivered Mpps | vs 1 queue | workers' CPU ns/pkt | packets sealed per worker |\n|---|---:|---:|---:|---:|---|\n",
    );
    let mut failed = None;
    for size in sizes {
        let mut base = None;
        for trial in 0..trials.max(1) {
            for q in [1u32, 2] {
                eprintln!("queues {q} size {} trial {}/{}", size.label(), trial + 1, trials.max(1));
                let (mpps, ns, per) = once(q, size, p)?;
                if q == 1 {
                    base = Some(mpps);
                }
                if mpps <= 0.0 || per.len() != q as usize || per.contains(&0) {
                    failed = Some(format!("{q} queue(s), {}: sealed per worker {per:?}", size.label()));
                }
                let vs = base.map_or(String::from("-"), |b| format!("{:.2}x", mpps / b));
                md += &format!("| {} | {q} | {mpps:.3} | {vs} | {ns:.0} | {per:?} |\n", size.label());
            }
        }
    }
    println!("\n{md}");
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("queues.md"), &md)?;
    eprintln!("results written to {}", dir.display());
    if let Some(f) = failed {
        anyhow::bail!("a worker carried nothing: {f}");
    }
    Ok(())
}

/// One measurement with `q` queues: (delivered Mpps, workers' CPU ns per
/// packet they sealed, tunnel_tx per worker).
fn once(q: u32, size: &Size, p: &Params) -> Result<(f64, f64, Vec<u64>)> {
    let t = TwoSites::with_queues(q)?;
    let cores = if q == 1 { "0".to_string() } else { "0,1".to_string() };
    // start_gw pins site A's worker to fwd_core; with two queues the
    // workers take cores 0 and 1 ([Tuning] Cores, round-robin).
    let ga = if q == 1 {
        start_gw(&t, "subway", true, p)?
    } else {
        let cfg = t.subway_config(true, false, "") + &format!("\n[Tuning]\nCores = {cores}\n");
        super::rig::Gw::Subway(subway_testkit::Subway::start_bin(
            &t.gwa,
            &cfg,
            &subway_testkit::profile_bin("subway", &p.profile)?,
        )?)
    };
    let (ga, mac) = encrypt_rig(&t, ga, "subway", p)?;
    let super::rig::Gw::Subway(s) = &ga else {
        unreachable!("subway")
    };
    let pid = s.proc.pid();
    let tx0 = per_worker(s, "tunnel_tx")?;
    let cpu0 = crate::cpu::threads_cpu_ns(pid, "subway-w");
    // A generator per queue, each on its own core.
    let rows: Vec<Result<crate::report::Row>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..q)
            .map(|i| {
                let (t, mac) = (&t, &mac);
                sc.spawn(move || {
                    let mut g = Gen::plain(&t.a, mac);
                    g.extra.extend(["--queue".to_string(), i.to_string()]);
                    let pi = Params {
                        gen_core: if q == 1 { p.gen_core } else { i as usize },
                        ..p.clone()
                    };
                    offer(&g, (&t.gwb, "wan0"), "subway", size, &pi)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let cpu = crate::cpu::threads_cpu_ns(pid, "subway-w") - cpu0;
    let tx1 = per_worker(s, "tunnel_tx")?;
    let rows: Vec<crate::report::Row> = rows.into_iter().collect::<Result<_>>()?;
    // Every generator's window counts the one sink: the first one's count
    // is the total over (nearly) the same window.
    let r = &rows[0];
    let delivered = r.delivered as f64;
    let per: Vec<u64> = tx1.iter().zip(&tx0).map(|(a, b)| a - b).collect();
    let sealed: u64 = per.iter().sum();
    Ok((delivered / r.seconds / 1e6, cpu as f64 / sealed.max(1) as f64, per))
}

fn per_worker(s: &subway_testkit::Subway, k: &str) -> Result<Vec<u64>> {
    let v = s.show().context("subway show")?;
    Ok(v["workers"]
        .as_array()
        .map(|ws| ws.iter().map(|w| w["counters"][k].as_u64().unwrap_or(0)).collect())
        .unwrap_or_default())
}
